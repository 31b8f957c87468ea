"""gs:// everywhere: the report, pretrained weights and a whole train_and_eval run on a GCS emulator.

The emulator runs on loopback, started and stopped by the ``gcs`` fixture (tests/gcs_emulator.py).
TensorStore and google-cloud-storage are pointed at it through their emulator settings.
TensorFlow's gs:// file system (used by etils.epath, TFDS, CLU's TensorBoard writer) has no
endpoint setting, so the narrowest substitute is used for it: its own libcurl proxy and CA
settings send it to the same emulator (see gcs_emulator.py for exactly how and why).
What reached the bucket is always checked through the emulator's JSON API directly, never
through the libraries under test.
"""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import data_fixtures as fx
from gcs_emulator import gcs  # noqa: F401  (the fixture)
from lmoe_jax.models import pretrained
from lmoe_jax.ood import report
from run_helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-written metrics dict of the shape lmoe_jax.evaluate builds (fractions in [0, 1]).
METRICS = {
    'id_set': 'id_test', 'id_accuracy': 0.75,
    'num_images': {'id_test': 6, 'near': 4},
    'kinds': {'id_test': 'id', 'near': 'fine_ood'},
    'config': {'num_subsamples': 3},
    'scores': {
        'msp': {'near': {'openood_fpr95': 0.5, 'openood_auroc': 0.8125, 'mixoe_tnr95': 0.25,
                         'mixoe_tnr95_std': 0.05},
                'fine_mean': {'openood_fpr95': 0.5, 'openood_auroc': 0.8125}},
        'energy': {'near': {'openood_fpr95': 0.25, 'openood_auroc': 0.875},
                   'fine_mean': {'openood_fpr95': 0.25, 'openood_auroc': 0.875}},
    },
}
SET_SCORES = {
    'id_test': {'msp': np.array([0.9, 0.8, 0.95, 0.7, 0.85, 0.6]),
                'energy': np.array([3.0, 2.5, 3.5, 2.0, 2.8, 1.5])},
    'near': {'msp': np.array([0.5, 0.65, 0.4, 0.75]), 'energy': np.array([1.0, 1.8, 0.5, 2.2])},
}


def files_under(emulator, prefix):
    """Object names below ``prefix``, relative to it; TF's directory markers ('x/') left out."""
    return sorted(n[len(prefix):] for n in emulator.list(prefix) if not n.endswith('/'))


def test_report_on_gcs_holds_the_same_files_as_a_local_one(gcs, tmp_path, monkeypatch):  # noqa: F811
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a gs:// path mistaken for a local one would land here
    local = tmp_path / 'local'
    report.write_report(str(local), METRICS, SET_SCORES)
    paths = report.write_report(gcs.gs('unit', 'report'), METRICS, SET_SCORES)

    assert paths['json'] == gcs.gs('unit', 'report', 'ood_report.json')
    expected = sorted(str(p.relative_to(local)) for p in local.rglob('*') if p.is_file())
    assert 'ood_plots/msp_roc.png' in expected and 'ood_scores.npz' in expected
    assert files_under(gcs, 'unit/report/') == expected  # so no '.tmp' object is left either
    assert json.loads(gcs.read('unit/report/ood_report.json')) == METRICS
    for name in expected:
        if name != 'ood_scores.npz':  # a zip holds timestamps; compared by content below
            assert gcs.read('unit/report/' + name) == (local / name).read_bytes(), name
    saved = np.load(io.BytesIO(gcs.read('unit/report/ood_scores.npz')))
    assert sorted(saved.files) == sorted(f'{s}/{k}' for s in SET_SCORES for k in SET_SCORES[s])
    for key in saved.files:
        name, score = key.split('/')
        np.testing.assert_array_equal(saved[key], SET_SCORES[name][score])
    assert not list(cwd.iterdir())


def test_pretrained_weights_are_read_from_gcs(gcs):  # noqa: F811
    import ml_dtypes
    from safetensors.numpy import save
    rng = np.random.RandomState(0)
    state = {'conv1.weight': rng.rand(4, 3, 7, 7).astype(np.float32),
             'bn1.running_var': rng.rand(4).astype(ml_dtypes.bfloat16)}
    gcs.upload('weights/model.safetensors', save(state))
    for source in (gcs.gs('weights'), gcs.gs('weights', 'model.safetensors')):
        got = pretrained.read_state_dict(source)
        assert sorted(got) == sorted(state)
        for key, value in state.items():
            assert got[key].dtype == value.dtype
            np.testing.assert_array_equal(got[key], value)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        pretrained.read_state_dict(gcs.gs('weights', 'missing.safetensors'))


# ----------------------------------------------------------------------------- whole program

STEPS = 4


@pytest.mark.slow
def test_train_and_eval_with_workdir_and_tfds_data_on_gcs(gcs, tmp_path):  # noqa: F811
    """main.py --mode=train_and_eval with --workdir and TFDS data_dir both on gs://.

    The raw fake source files stay local (they are inputs); TFDS prepares the datasets into the
    bucket first, then the run reads them from there and writes every output there.
    """
    from configs import tiny
    from lmoe_jax.data import sources

    src = tmp_path / 'sources'
    fx.write_fake_fashion(str(src / 'fashion'), num_train=400, num_test=60)
    fx.write_fake_animals(str(src / 'animals'), num=80, duplicates=0)
    data = {'fashion_mnist_dir': str(src / 'fashion'), 'animal_mnist_dir': str(src / 'animals'),
            'data_dir': gcs.gs('tfds')}
    config = tiny.get_config()
    config.data.update(data)
    for name in (config.data.dataset, config.data.outlier_dataset, *config.data.coarse_ood):
        sources.open_builder(name, config.data)  # prepares into gs://.../tfds
        assert any(n.endswith('dataset_info.json') for n in gcs.list(f'tfds/{name}/')), name
    sources_before = sorted(str(p) for p in src.rglob('*'))

    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    env = {**os.environ, **gcs.env, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': xla_flags(1)}
    env.pop('JAX_COMPILATION_CACHE_DIR', None)  # the product's default: the cache in the workdir
    command = [sys.executable, os.path.join(ROOT, 'main.py'),
               f'--config={os.path.join(ROOT, "configs", "tiny.py")}',
               f'--workdir={gcs.gs("run")}', '--mode=train_and_eval',
               *[f'--config.data.{k}={v}' for k, v in data.items()],
               f'--config.num_train_steps={STEPS}', '--config.eval_every_steps=2',
               '--config.checkpoint_every_steps=2', '--config.log_every_steps=1']
    out = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f'stdout:\n{out.stdout[-3000:]}\nstderr:\n{out.stderr[-6000:]}'

    run = files_under(gcs, 'run/')
    # Orbax: both checkpoints complete (its commit marker on GCS), the config saved beside them
    for step in (2, STEPS):
        for name in ('commit_success.txt', 'state/manifest.ocdbt', 'config/metadata'):
            assert f'checkpoints/{step}/{name}' in run, run
    saved_config = json.loads(gcs.read(f'run/checkpoints/{STEPS}/config/metadata'))
    assert saved_config['num_train_steps'] == STEPS
    assert saved_config['data']['data_dir'] == gcs.gs('tfds')
    # JAX's persistent compilation cache lives in the workdir too
    assert any(n.startswith('jax_cache/') for n in run), run
    # CLU: TensorBoard event files holding the training scalars
    events = [n for n in run if os.path.basename(n).startswith('events.out.tfevents')]
    assert events, run
    tags = set()
    for i, name in enumerate(events):
        copy = tmp_path / f'events_{i}'
        copy.write_bytes(gcs.read('run/' + name))
        tags |= {v.tag for e in _events(str(copy)) for v in e.summary.value}
    assert any(tag.startswith('train') for tag in tags), tags
    # the OOD report
    for name in ('ood_report.json', 'ood_report.md', 'ood_report.csv', 'ood_scores.npz'):
        assert name in run, run
    assert any(n.startswith('ood_plots/') and n.endswith('.png') for n in run), run
    saved = json.loads(gcs.read('run/ood_report.json'))
    assert {'msp', 'energy'} <= set(saved['scores'])
    # and nothing written to local disk in their place
    assert not list(cwd.iterdir()), list(cwd.iterdir())
    assert not os.path.exists(os.path.join(ROOT, 'gs:'))
    assert sorted(str(p) for p in src.rglob('*')) == sources_before


def _events(path):
    import tensorflow as tf
    return list(tf.compat.v1.train.summary_iterator(path))
