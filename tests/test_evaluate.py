"""evaluate() and ood_metrics() end to end on a tiny model and tiny synthetic sets."""
import csv
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk

from lmoe_jax import evaluate as ev
from lmoe_jax.ood import sources

H = 8
K = 3


class TinyNet(nn.Module):
    """Conv -> BN -> pool -> Dense features -> Dense 'fc' (the final-layer name ViM/ReAct read)."""

    @nn.compact
    def __call__(self, x, train=False, return_features=False):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        feats = nn.relu(nn.Dense(6)(x))
        logits = nn.Dense(K, name='fc')(feats)
        return (logits, feats) if return_features else logits


@pytest.fixture(scope='module')
def setup():
    rng = np.random.default_rng(0)
    templates = rng.normal(0, 1, (K + 1, H, H, 1)).astype(np.float32)

    def draw(n, classes, noise=0.3):
        y = rng.choice(classes, n)
        return (templates[y] + noise * rng.normal(size=(n, H, H, 1))).astype(np.float32), y.astype(np.int32)

    model = TinyNet()
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, H, H, 1), np.float32))
    id_x, id_y = draw(40, [0, 1, 2])
    fine_x, _ = draw(25, [3])
    noise_x = rng.uniform(-2, 2, (30, H, H, 1)).astype(np.float32)
    flat_x = (0.1 * rng.normal(size=(20, H, H, 1))).astype(np.float32)
    train_x, train_y = draw(48, [0, 1, 2])
    return dict(model=model, variables=variables, id=(id_x, id_y), fine=fine_x, noise=noise_x,
                flat=flat_x, train=(train_x, train_y))


def padded_source(images, labels=None, batch_size=16):
    """Like the data pipeline: padded last batch, mask; padding filled with junk on purpose."""
    labels = np.zeros(len(images), np.int32) - 1 if labels is None else labels

    def batches():
        for i in range(0, len(images), batch_size):
            img, lab = images[i:i + batch_size], labels[i:i + batch_size]
            n = len(img)
            pad = batch_size - n
            yield {'image': np.concatenate([img, np.full((pad,) + img.shape[1:], 1e3, np.float32)]),
                   'label': np.concatenate([lab, np.full(pad, -1, np.int32)]),
                   'mask': np.arange(batch_size) < n}
    return batches


def eval_sets(s):
    return [sources.EvalSet('id_test', 'id', padded_source(*s['id'])),
            sources.EvalSet('fine', 'fine_ood', padded_source(s['fine'])),
            sources.EvalSet('noise', 'coarse_ood', padded_source(s['noise'])),
            sources.EvalSet('flat', 'coarse_ood', padded_source(s['flat']))]


class RecordingWriter:
    def __init__(self):
        self.scalars, self.images, self.texts, self.flushed = {}, {}, {}, False

    def write_scalars(self, step, scalars):
        self.scalars.update(scalars)

    def write_images(self, step, images):
        self.images.update(images)

    def write_texts(self, step, texts):
        self.texts.update(texts)

    def flush(self):
        self.flushed = True


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_log_odds_msp(z):
    """log(p / (1 - p)) of the max softmax probability in float64 (1 - p as the others' sum)."""
    p = np_softmax(np.asarray(z, np.float64))
    is_top = np.eye(p.shape[1], dtype=bool)[p.argmax(-1)]
    return np.log(p[is_top]) - np.log(np.where(is_top, 0.0, p).sum(-1))


@pytest.fixture(scope='module')
def full_run(setup, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('eval'))
    writer = RecordingWriter()
    metrics = ev.evaluate(
        apply_fn=setup['model'].apply, variables=setup['variables'], eval_sets=eval_sets(setup),
        fit_sets={'train': padded_source(*setup['train'])}, workdir=workdir, writer=writer,
        scores=ev.DEFAULT_SCORES, score_config=ev.ScoreConfig(vim_dim=2, odin_input_std='imagenet'),
        plots=True)
    return metrics, workdir, writer


def test_scores_and_metrics_match_independent_computation(setup, full_run):
    metrics, workdir, _ = full_run
    assert metrics['num_images'] == {'id_test': 40, 'fine': 25, 'noise': 30, 'flat': 20}
    apply = lambda x: np.asarray(setup['model'].apply(setup['variables'], x), np.float64)  # noqa: E731
    id_logits = apply(setup['id'][0])
    assert metrics['id_accuracy'] == pytest.approx(np.mean(id_logits.argmax(-1) == setup['id'][1]))
    saved = np.load(os.path.join(workdir, 'ood_scores.npz'))
    conf = {'id_test': np_log_odds_msp(id_logits)}
    for name in ('fine', 'noise', 'flat'):
        logits = apply(setup[name])
        conf[name] = np_log_odds_msp(logits)
        np.testing.assert_allclose(saved[f'{name}/max_logit'], logits.max(-1), rtol=1e-5)
    for name, values in conf.items():
        np.testing.assert_allclose(saved[f'{name}/msp'], values, rtol=1e-4, atol=1e-5)
    for name in ('fine', 'noise', 'flat'):
        is_ood = np.r_[np.zeros(40), np.ones(len(conf[name]))]
        score = np.r_[conf['id_test'], conf[name]]
        fpr, tpr, _ = sk.roc_curve(is_ood, -score, drop_intermediate=False)
        row = metrics['scores']['msp'][name]
        assert row['openood_auroc'] == pytest.approx(sk.roc_auc_score(is_ood, -score), abs=1e-6)
        assert row['openood_fpr95'] == pytest.approx(fpr[np.argmax(tpr >= 0.95)], abs=1e-6)
    rows = metrics['scores']['msp']
    assert rows['fine_mean']['openood_auroc'] == pytest.approx(rows['fine']['openood_auroc'])
    assert rows['coarse_mean']['mixoe_tnr95'] == pytest.approx(
        (rows['noise']['mixoe_tnr95'] + rows['flat']['mixoe_tnr95']) / 2)
    for score in ev.DEFAULT_SCORES:
        for name in conf:
            assert np.all(np.isfinite(saved[f'{name}/{score}'])), (score, name)
            assert len(saved[f'{name}/{score}']) == metrics['num_images'][name]


def test_report_files(full_run):
    metrics, workdir, _ = full_run
    with open(os.path.join(workdir, 'ood_report.json')) as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    with open(os.path.join(workdir, 'ood_report.md')) as f:
        md = f.read()
    headings = [line[3:] for line in md.splitlines() if line.startswith('## ')]
    assert headings[0] == 'msp' and sorted(headings) == sorted(ev.DEFAULT_SCORES)
    for row in ('fine', 'noise', 'flat', 'fine_mean', 'coarse_mean'):
        assert f'| {row} |' in md
    with open(os.path.join(workdir, 'ood_report.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(ev.DEFAULT_SCORES) * 5
    first = rows[0]
    assert first['score'] == 'msp' and first['set'] == 'fine'
    assert float(first['openood_auroc']) == pytest.approx(metrics['scores']['msp']['fine']['openood_auroc'])
    for score in ev.DEFAULT_SCORES:
        for kind in ('histogram', 'roc'):
            with open(os.path.join(workdir, 'ood_plots', f'{score}_{kind}.png'), 'rb') as f:
                assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert not [p for p in os.listdir(workdir) if '.tmp' in p]


def test_writer_receives_scalars_images_and_table(full_run):
    metrics, _, writer = full_run
    assert writer.scalars['ood/msp/fine/openood_auroc'] == metrics['scores']['msp']['fine']['openood_auroc']
    assert writer.scalars['ood/id_accuracy'] == metrics['id_accuracy']
    img = writer.images['ood/vim/roc']
    assert img.ndim == 4 and img.shape[0] == 1 and img.shape[-1] == 3 and img.dtype == np.uint8
    assert 'fine_mean' in writer.texts['ood/msp_table'] and writer.flushed


def test_msp_table_text(full_run):
    text = ev.format_msp_table(full_run[0])
    assert text.startswith('MSP score') and 'accuracy' in text
    assert all(name in text for name in ('fine', 'noise', 'flat', 'coarse_mean'))
    with pytest.raises(ValueError, match='not evaluated'):
        ev.format_table(full_run[0], 'nope')


def test_notebook_entry_from_logits_matches_sklearn(setup):
    rng = np.random.default_rng(1)
    id_logits = rng.normal(0, 1, (50, 4)) + 3 * np.eye(4)[rng.integers(0, 4, 50)]
    ood_logits = rng.normal(0, 1, (30, 4))
    m = ev.ood_metrics((id_logits, np.argmax(id_logits, -1)), {'far': ood_logits}, kinds={'far': 'coarse_ood'})
    assert set(m['scores']) == {'msp', 'max_logit', 'energy', 'gen'}
    assert m['id_accuracy'] == 1.0
    conf_id, conf_ood = np_softmax(id_logits).max(-1), np_softmax(ood_logits).max(-1)  # float64: no ties
    y = np.r_[np.ones(50), np.zeros(30)]
    score = np.r_[conf_id, conf_ood]
    assert m['scores']['msp']['far']['openood_auroc'] == pytest.approx(sk.roc_auc_score(y, score), abs=1e-6)
    p, r, _ = sk.precision_recall_curve(y, score)
    assert m['scores']['msp']['far']['openood_aupr_in'] == pytest.approx(sk.auc(r, p), abs=1e-6)
    assert 'coarse_mean' in m['scores']['msp']
    with pytest.raises(ValueError, match='ODIN'):
        ev.ood_metrics(id_logits, ood_logits, scores=('odin',))


def test_notebook_entry_with_features_fits_scores(setup):
    rng = np.random.default_rng(2)
    w, b = rng.normal(size=(6, 3)), rng.normal(size=3)
    make = lambda n, shift: (lambda f: {'logits': f @ w + b, 'features': f})(  # noqa: E731
        np.abs(rng.normal(shift, 1, (n, 6))))
    fit = make(60, 1.0)
    fit['label'] = np.argmax(fit['logits'], -1)
    m = ev.ood_metrics(make(30, 1.0), make(20, 3.0), fit_data=fit, fc_params=(w, b),
                       score_config=ev.ScoreConfig(vim_dim=2))
    assert set(m['scores']) == {'msp', 'max_logit', 'energy', 'gen', 'kl_matching', 'mahalanobis', 'vim', 'react'}
    assert m['id_accuracy'] is None and m['scores']['mahalanobis']['ood']['openood_auroc'] > 0.5


def test_notebook_entry_with_model_arrays_and_tf_data_agree_with_evaluate(setup, full_run):
    import tensorflow as tf
    kw = dict(apply_fn=setup['model'].apply, variables=setup['variables'], input_normalization='imagenet',
              scores=('msp', 'energy', 'odin'), plots=False, batch_size=16)
    from_arrays = ev.ood_metrics(setup['id'], {'fine': setup['fine']}, kinds={'fine': 'fine_ood'}, **kw)
    ds = tf.data.Dataset.from_tensor_slices(setup['id'])
    from_tf = ev.ood_metrics(ds, {'fine': tf.data.Dataset.from_tensor_slices(setup['fine']).batch(7)},
                             kinds={'fine': 'fine_ood'}, **kw)
    for score in ('msp', 'energy', 'odin'):
        want = full_run[0]['scores'][score]['fine']
        for got in (from_arrays, from_tf):
            for key in want:
                assert got['scores'][score]['fine'][key] == pytest.approx(want[key], abs=1e-6), (score, key)
    assert from_tf['id_accuracy'] == pytest.approx(full_run[0]['id_accuracy'])
    # images without labels: no accuracy; without input_normalization: no ODIN by default
    bare = ev.ood_metrics(setup['id'][0], setup['fine'], apply_fn=setup['model'].apply,
                          variables=setup['variables'], batch_size=16, plots=False)
    assert bare['id_accuracy'] is None and set(bare['scores']) == {'msp', 'max_logit', 'energy', 'gen'}


def test_odin_is_the_perturbed_score_recomputed_with_jax(setup, full_run):
    # OpenOOD's ODIN by hand: sign(grad >= 0) of the tempered CE of the predicted class, divided
    # by the input std (grey ImageNet normalisation: the mean of the three stds), T=1000, eps=0.0014
    apply = lambda x: setup['model'].apply(setup['variables'], x)  # noqa: E731
    std = np.mean([0.229, 0.224, 0.225])

    def ce(x):
        z = apply(x) / 1000.0
        return -jnp.sum(jax.nn.log_softmax(z)[jnp.arange(len(x)), jnp.argmax(z, -1)])

    x = setup['noise']
    grad = np.asarray(jax.grad(ce)(x))
    perturbed = x - 0.0014 * np.where(grad >= 0, 1.0, -1.0).astype(np.float32) / std
    want = np_log_odds_msp(np.asarray(apply(perturbed), np.float64) / 1000.0)
    saved = np.load(os.path.join(full_run[1], 'ood_scores.npz'))
    np.testing.assert_allclose(saved['noise/odin'], want, rtol=1e-4, atol=1e-6)
    assert full_run[0]['config']['odin_input_std'] == 'imagenet'


def test_sharded_global_arrays_give_the_same_metrics(setup, full_run):
    """The multi-host path (batch as a global array over 8 devices, outputs replicated back)
    gives what the unsharded run gave, fitted scores included."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()), ('data',))
    scores = ('msp', 'odin', 'energy', 'mahalanobis', 'vim')
    m = ev.evaluate(apply_fn=setup['model'].apply, variables=setup['variables'], eval_sets=eval_sets(setup),
                    fit_sets={'train': padded_source(*setup['train'])}, scores=scores,
                    score_config=ev.ScoreConfig(vim_dim=2, odin_input_std='imagenet'),
                    batch_sharding=NamedSharding(mesh, P('data')))
    assert m['id_accuracy'] == full_run[0]['id_accuracy'] and m['num_images'] == full_run[0]['num_images']
    for score in scores:
        for row, values in full_run[0]['scores'][score].items():
            for key, value in values.items():
                assert m['scores'][score][row][key] == pytest.approx(value, abs=1e-6), (score, row, key)


def test_only_process_zero_writes(setup, tmp_path, monkeypatch):
    writer = RecordingWriter()
    kw = dict(apply_fn=setup['model'].apply, variables=setup['variables'], eval_sets=eval_sets(setup),
              scores=('msp',), writer=writer, plots=False)
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    other = ev.evaluate(workdir=str(tmp_path / 'p1'), **kw)
    assert not (tmp_path / 'p1').exists() and not writer.scalars
    monkeypatch.setattr(jax, 'process_index', lambda: 0)
    main = ev.evaluate(workdir=str(tmp_path / 'p0'), **kw)
    assert (tmp_path / 'p0' / 'ood_report.json').exists() and writer.scalars
    assert other == main


def test_invalid_calls_are_clear_errors(setup):
    kw = dict(apply_fn=setup['model'].apply, variables=setup['variables'])
    sets = eval_sets(setup)
    with pytest.raises(ValueError, match="exactly one 'id' set"):
        ev.evaluate(eval_sets=sets[1:], scores=('msp',), **kw)
    with pytest.raises(ValueError, match='unique'):
        ev.evaluate(eval_sets=sets + sets[1:2], scores=('msp',), **kw)
    with pytest.raises(ValueError, match='unknown'):
        ev.evaluate(eval_sets=sets, scores=('msp', 'softmax'), **kw)
    with pytest.raises(ValueError, match='normalised'):
        ev.evaluate(eval_sets=sets, scores=('msp', 'odin'), **kw)
    with pytest.raises(ValueError, match='fit_sets'):
        ev.evaluate(eval_sets=sets, scores=('msp', 'mahalanobis'), **kw)
    with pytest.raises(ValueError, match='kind'):
        ev.evaluate(eval_sets=[sources.EvalSet('x', 'test', sets[0].batches)] + sets[1:], scores=('msp',), **kw)
    with pytest.raises(ValueError, match='fc_params'):
        ev.evaluate(eval_sets=sets, scores=('react',), fit_sets=padded_source(*setup['train']),
                    apply_fn=setup['model'].apply, variables={'params': {}, 'batch_stats': {}})
