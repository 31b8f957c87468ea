"""OOD scores and their fitted statistics against plain numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmoe_jax.ood import fitting
from lmoe_jax.ood import scores as S


def np_softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_logsumexp(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1)
    return m + np.log(np.exp(z - m[:, None]).sum(-1))


@pytest.fixture(scope='module')
def data():
    rng = np.random.default_rng(0)
    K, D = 5, 12
    return {'logits': rng.normal(0, 3, (16, K)).astype(np.float32),
            'features': np.abs(rng.normal(1, 1, (16, D))).astype(np.float32),
            'kernel': rng.normal(0, 0.5, (D, K)).astype(np.float32),
            'bias': rng.normal(0, 0.1, K).astype(np.float32), 'rng': rng}


def np_log_odds_msp(z):
    """log(p / (1 - p)) of the max softmax probability, float64, 1 - p as the others' sum."""
    p = np_softmax(z)
    is_top = np.eye(p.shape[1], dtype=bool)[p.argmax(-1)]
    return np.log(p[is_top]) - np.log(np.where(is_top, 0.0, p).sum(-1))  # the others summed, not 1 - p


def test_logit_scores(data):
    z = data['logits']
    np.testing.assert_allclose(jax.jit(S.msp)(z), np_log_odds_msp(z), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.nn.sigmoid(S.msp(z)), np_softmax(z).max(-1), rtol=1e-5)
    np.testing.assert_allclose(S.max_logit(z), z.max(-1), rtol=1e-6)
    np.testing.assert_allclose(S.energy(z), np_logsumexp(z), rtol=1e-5)
    np.testing.assert_allclose(S.energy(z, 2.5), 2.5 * np_logsumexp(z / 2.5), rtol=1e-5)
    p = np.sort(np_softmax(z), -1)[:, ::-1]
    for gamma, m in ((0.1, 100), (0.5, 3)):
        top = p[:, :min(m, p.shape[1])]
        want = -(top ** gamma * (1 - top) ** gamma).sum(-1)
        np.testing.assert_allclose(S.gen(z, gamma, m), want, rtol=1e-4)
    # higher = more ID: a peaked logit vector beats a flat one on every logit score
    peaked, flat = np.array([[8.0, 0, 0, 0, 0]]), np.zeros((1, 5))
    for fn in (S.msp, S.max_logit, S.energy, S.gen):
        assert float(fn(peaked)[0]) > float(fn(flat)[0])
    # two equal top logits: p = 1/2 of each, log-odds 0
    np.testing.assert_allclose(S.msp(np.array([[3.0, 3.0, -50.0]])), [0.0], atol=1e-6)


def test_softmax_scores_do_not_saturate_in_float32():
    # margins of 18..60: a float32 softmax gives p = 1.0 exactly for every row, one big tie
    margins = np.linspace(18.0, 60.0, 50)
    z = np.zeros((50, 10), np.float32)
    z[:, 3] = margins
    z[:, 7] = -1.0
    assert len(np.unique(np.asarray(jax.nn.softmax(z).max(-1)))) == 1  # the tie MSP used to give
    got = np.asarray(S.msp(z))
    assert len(np.unique(got)) == 50 and np.all(np.diff(got) > 0)  # ranks follow the margins
    np.testing.assert_allclose(got, np_log_odds_msp(z), rtol=1e-5)
    # GEN keeps 1 - p of the top class from the other logits: distinct, in margin order
    gen = np.asarray(S.gen(z, 0.1, 100))
    p = np_softmax(z)
    is_top = np.eye(10, dtype=bool)[p.argmax(-1)]
    one_minus = np.where(is_top, np.where(is_top, 0.0, p).sum(-1, keepdims=True), 1 - p)
    np.testing.assert_allclose(gen, -(p ** 0.1 * one_minus ** 0.1).sum(-1), rtol=1e-4)
    assert np.all(np.diff(gen) > 0)


def test_kl_matching(data):
    z = data['logits']
    templates = np_softmax(data['rng'].normal(0, 2, (3, z.shape[1])))
    p = np_softmax(z)
    kl = np.array([[np.sum(pi * np.log(pi / t)) for t in templates] for pi in p])
    np.testing.assert_allclose(S.kl_matching(z, templates), -kl.min(-1), rtol=1e-4, atol=1e-5)


def test_mahalanobis(data):
    f = data['features'].astype(np.float64)
    rng = data['rng']
    means = rng.normal(1, 1, (4, f.shape[1]))
    a = rng.normal(size=(f.shape[1], f.shape[1]))
    precision = np.linalg.inv(a @ a.T / f.shape[1] + np.eye(f.shape[1]))
    dist = np.array([[(x - m) @ precision @ (x - m) for m in means] for x in f])
    np.testing.assert_allclose(S.mahalanobis(f, means, precision), -dist.min(-1), rtol=1e-4, atol=1e-4)


def test_vim_and_react(data):
    f, z = data['features'], data['logits']
    origin = data['rng'].normal(size=f.shape[1])
    q, _ = np.linalg.qr(data['rng'].normal(size=(f.shape[1], f.shape[1])))
    ns = q[:, 4:]
    want = np_logsumexp(z) - 0.7 * np.linalg.norm((f - origin) @ ns, axis=-1)
    np.testing.assert_allclose(S.vim(z, f, origin, ns, 0.7), want, rtol=1e-4, atol=1e-4)
    w, b = data['kernel'], data['bias']
    want = np_logsumexp(np.minimum(f, 1.3) @ w + b)
    np.testing.assert_allclose(S.react(f, w, b, 1.3), want, rtol=1e-5)


def test_odin_matches_a_hand_derived_gradient(data):
    # linear model z = flatten(x) W + b: d(-log softmax(z/T)_y)/dx = W (softmax(z/T) - onehot(y)) / T
    rng = data['rng']
    x = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    b = rng.normal(size=5).astype(np.float32)
    logits_fn = lambda img: img.reshape(img.shape[0], -1) @ w + b  # noqa: E731
    T, eps = 10.0, 0.05
    std = np.array([0.5, 1.0, 2.0], np.float32)
    flat = x.reshape(6, -1).astype(np.float64)
    z = flat @ w + b
    p = np_softmax(z / T)
    grad = (p - np.eye(5)[p.argmax(-1)]) @ w.T / T
    sign = np.where(grad >= 0, 1.0, -1.0)  # OpenOOD: (grad >= 0) mapped to +1 / -1
    step = (sign.reshape(6, 2, 2, 3) / std).reshape(6, -1)  # per channel (last axis), pixel units
    want = np_log_odds_msp(((flat - eps * step) @ w + b) / T)
    got = jax.jit(lambda im: S.odin(logits_fn, im, T, eps, input_std=std))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # the step raises the tempered confidence, and rows do not interact
    assert np.all(np.asarray(got) >= np_log_odds_msp(z / T) - 1e-5)
    np.testing.assert_allclose(S.odin(logits_fn, x[:2], T, eps, input_std=std), got[:2], rtol=1e-6)
    with pytest.raises(ValueError, match='per channel'):
        S.odin(logits_fn, x, T, eps, input_std=[0.5])


def test_normalization_std_undoes_the_pipeline_normalisation():
    import tensorflow as tf
    import ml_collections
    from lmoe_jax.data import preprocess
    for normalize in preprocess.NORMALIZATIONS:
        for channels in (1, 3):
            t = preprocess.Transform(image_size=4, resize_size=None, channels=channels, normalize=normalize)
            # a pixel step of 1 moves the normalised input by 1 / std per channel
            step = preprocess._normalize(tf.ones([1, 1, channels]), t) - preprocess._normalize(
                tf.zeros([1, 1, channels]), t)
            np.testing.assert_allclose(1.0 / np.asarray(step).reshape(-1),
                                       S.normalization_std(normalize, channels), rtol=1e-6)
    cfg = ml_collections.ConfigDict({'normalize': 'imagenet', 'grayscale': False, 'image_size': 8})
    assert S.normalization_std_from_config(cfg) == pytest.approx((0.229, 0.224, 0.225))
    with pytest.raises(ValueError, match='normalize'):
        S.normalization_std('cifar', 3)


def _batches(arrays, size):
    n = len(arrays['logits'])
    return lambda: ({k: v[i:i + size] for k, v in arrays.items()} for i in range(0, n, size))


def test_fitting_streams_match_full_batch_numpy():
    rng = np.random.default_rng(1)
    N, K, D = 90, 3, 10
    labels = rng.integers(0, K, N)
    feats = rng.normal(0, 1, (N, D)) + 50.0 + 3.0 * labels[:, None]  # large offset: precision check
    kernel = rng.normal(size=(D, K))
    bias = rng.normal(size=K)
    logits = feats @ kernel + bias
    val_logits = rng.normal(0, 2, (40, K))
    stream = _batches({'logits': logits, 'features': feats, 'label': labels}, 16)
    stats = fitting.fit_score_statistics(
        stream, scores=('kl_matching', 'mahalanobis', 'vim', 'react'), fc_params=(kernel, bias),
        val_stream=_batches({'logits': val_logits}, 7), vim_dim=3, react_percentile=80.0)

    means = np.stack([feats[labels == k].mean(0) for k in range(K)])
    centred = feats - means[labels]
    cov = centred.T @ centred / N
    np.testing.assert_allclose(stats['mahalanobis']['class_means'], means, rtol=1e-6)
    np.testing.assert_allclose(stats['mahalanobis']['precision'], np.linalg.pinv(cov), rtol=2e-4, atol=1e-5)

    origin = -np.linalg.pinv(kernel.T) @ bias
    np.testing.assert_allclose(origin @ kernel + bias, 0, atol=1e-8)  # origin has zero logits
    x = feats - origin
    eigval, eigvec = np.linalg.eigh(x.T @ x / N)
    ns = eigvec[:, np.argsort(eigval)[::-1][3:]]
    got_ns = stats['vim']['null_space'].astype(np.float64)
    np.testing.assert_allclose(got_ns @ got_ns.T, ns @ ns.T, atol=1e-4)  # same subspace
    alpha = logits.max(-1).mean() / np.linalg.norm(x @ ns, axis=-1).mean()
    np.testing.assert_allclose(stats['vim']['alpha'], alpha, rtol=1e-4)
    np.testing.assert_allclose(stats['vim']['origin'], origin, rtol=1e-5, atol=1e-5)

    np.testing.assert_allclose(stats['react']['threshold'], np.percentile(feats, 80.0), rtol=1e-6)
    np.testing.assert_allclose(stats['react']['kernel'], kernel, rtol=1e-6)

    p = np_softmax(val_logits)
    pred = p.argmax(-1)
    want = np.stack([p[pred == k].mean(0) for k in range(K) if np.any(pred == k)])
    np.testing.assert_allclose(stats['kl_matching']['class_mean_probs'], want, rtol=1e-5)


def test_mahalanobis_skips_classes_absent_from_fit_data():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(20, 4))
    labels = np.r_[np.zeros(10, int), np.full(10, 2)]
    stats = fitting.fit_score_statistics(
        _batches({'logits': rng.normal(size=(20, 3)), 'features': feats, 'label': labels}, 8),
        scores=('mahalanobis',))
    assert stats['mahalanobis']['class_means'].shape == (2, 4)


def test_reservoir_keeps_a_uniform_sample_when_full():
    values = np.arange(100_000, dtype=np.float64)
    res = fitting.ValueReservoir(5_000, seed=0)
    for chunk in np.array_split(values, 37):
        res.update(chunk)
    sample = res.values[:res.filled]
    assert res.filled == 5_000 and len(np.unique(sample)) == 5_000
    # a uniform sample's 90th percentile is near the true one (std ~ 0.4% of the range)
    assert abs(res.percentile(90) - np.percentile(values, 90)) < 0.02 * 100_000
    small = fitting.ValueReservoir(1_000)
    small.update(values[:300])
    assert small.percentile(37) == np.percentile(values[:300], 37)  # exact while it fits


def test_fit_errors_are_clear():
    stream = _batches({'logits': np.zeros((4, 3)), 'features': np.ones((4, 5)), 'label': np.array([0, 1, 2, 5])}, 4)
    with pytest.raises(ValueError, match='labels'):
        fitting.fit_score_statistics(stream, scores=('mahalanobis',))
    with pytest.raises(ValueError, match='fc_params'):
        fitting.fit_score_statistics(stream, scores=('vim',))
    with pytest.raises(ValueError, match='ID training'):
        fitting.fit_score_statistics(None, scores=('react',), val_stream=stream)
    ok = _batches({'logits': np.zeros((4, 3)), 'features': np.ones((4, 5)), 'label': np.arange(4) % 3}, 4)
    with pytest.raises(ValueError, match='vim_dim'):
        fitting.fit_score_statistics(ok, scores=('vim',), fc_params=(np.ones((5, 3)), np.zeros(3)), vim_dim=5)
    assert fitting.fit_score_statistics(None, scores=('msp',)) == {}


def test_scores_are_float32_for_bfloat16_inputs(data):
    z = jnp.asarray(data['logits'], jnp.bfloat16)
    for fn in (S.msp, S.max_logit, S.energy, S.gen):
        assert fn(z).dtype == jnp.float32
