"""Input mixing: mixup against numpy, cutmix box geometry, lam sampling."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lmoe_jax import mixing


def images(b=6, h=12, w=10, c=3, seed=0):
    rng = np.random.default_rng(seed)
    # ID pixels in [0, 1), outlier pixels in [2, 3): every pixel tells where it came from
    return (jnp.asarray(rng.uniform(0, 1, (b, h, w, c)), jnp.float32),
            jnp.asarray(rng.uniform(2, 3, (b, h, w, c)), jnp.float32))


@pytest.mark.parametrize('per_example', [False, True])
def test_mixup_matches_numpy(per_example):
    x, xo = images()
    lam = np.linspace(0.1, 0.9, 6) if per_example else 0.3
    got = mixing.mixup(x, xo, jnp.asarray(lam, jnp.float32))
    lam_b = np.reshape(lam, (-1, 1, 1, 1)) if per_example else lam
    np.testing.assert_allclose(got, lam_b * np.float64(x) + (1 - lam_b) * np.float64(xo),
                               rtol=1e-6)


def test_mixup_keeps_bfloat16():
    x, xo = images()
    assert mixing.mixup(x.astype(jnp.bfloat16), xo.astype(jnp.bfloat16), 0.5).dtype == jnp.bfloat16


def _box_from_mixed(mixed):
    """Which pixels came from the outlier image (values >= 2), per example: [B, H, W]."""
    return np.asarray(mixed)[..., 0] >= 2.0


@pytest.mark.parametrize('per_example', [False, True])
def test_cutmix_box_area_matches_lam_exactly_and_id_pixels_untouched(per_example):
    x, xo = images()
    b, h, w, _ = x.shape
    cut = jax.jit(mixing.cutmix)
    for i in range(40):
        key = jax.random.key(i)
        lam = jax.random.uniform(jax.random.key(1000 + i), (b,) if per_example else ())
        mixed, lam_exact = cut(key, x, xo, lam)
        box = _box_from_mixed(mixed)
        lam_exact = np.broadcast_to(np.asarray(lam_exact), (b,))
        for j in range(b):
            area = box[j].sum()
            assert area == round((1 - lam_exact[j]) * h * w), (i, j)
            # the pasted region is one axis-aligned rectangle
            rows, cols = np.where(box[j].any(1))[0], np.where(box[j].any(0))[0]
            if area:
                assert area == len(rows) * len(cols)
                assert np.all(box[j][rows.min():rows.max() + 1, cols.min():cols.max() + 1])
                # side is at most floor(size * sqrt(1 - lam)) (MixOE / CutMix rule)
                lam_j = float(np.broadcast_to(np.asarray(lam), (b,))[j])
                assert len(rows) <= math.floor(h * math.sqrt(1 - lam_j))
                assert len(cols) <= math.floor(w * math.sqrt(1 - lam_j))
            np.testing.assert_array_equal(np.asarray(mixed)[j][~box[j]], np.asarray(x)[j][~box[j]])
            np.testing.assert_array_equal(np.asarray(mixed)[j][box[j]], np.asarray(xo)[j][box[j]])
        if not per_example:  # one box shared by the batch, as MixOE does
            assert all(np.array_equal(box[0], box[j]) for j in range(b))


def test_cutmix_unclipped_box_has_the_cutmix_side():
    """A box centred in the image is not clipped: its side is 2*(floor(S*sqrt(1-lam))//2)."""
    h = w = 64
    lam = 0.75  # sqrt(0.25) = 0.5 -> cut 32 -> half 16
    for i in range(200):
        mask, lam_exact = mixing.cutmix_box(jax.random.key(i), jnp.float32(lam), h, w)
        mask = np.asarray(mask)
        rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
        if rows.min() > 0 and rows.max() < h - 1 and cols.min() > 0 and cols.max() < w - 1:
            assert len(rows) == len(cols) == 32
            assert float(lam_exact) == pytest.approx(1 - 32 * 32 / (h * w))
            return
    pytest.fail('no unclipped box in 200 draws')


def test_cutmix_same_key_same_result_other_key_differs():
    x, xo = images()
    a = mixing.cutmix(jax.random.key(7), x, xo, 0.4)
    b = mixing.cutmix(jax.random.key(7), x, xo, 0.4)
    c = mixing.cutmix(jax.random.key(8), x, xo, 0.4)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_sample_lam_follows_beta():
    for alpha in (1.0, 2.0, 0.4):
        lam = np.asarray(mixing.sample_lam(jax.random.key(0), alpha, (4000,)))
        assert lam.dtype == np.float32 and lam.min() >= 0 and lam.max() <= 1
        assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    assert mixing.sample_lam(jax.random.key(0), 1.0).shape == ()
    with pytest.raises(ValueError, match='alpha'):
        mixing.sample_lam(jax.random.key(0), 0.0)


@pytest.mark.parametrize('kind', ['mixup', 'cutmix'])
def test_mix_batch_is_jittable_and_deterministic(kind):
    x, xo = images()
    f = jax.jit(mixing.mix_batch, static_argnames=('kind', 'alpha', 'per_example'))
    m1, l1 = f(jax.random.key(3), x, xo, kind=kind, alpha=1.0, per_example=True)
    m2, l2 = f(jax.random.key(3), x, xo, kind=kind, alpha=1.0, per_example=True)
    np.testing.assert_array_equal(m1, m2)
    assert l1.shape == (6,) and m1.shape == x.shape
    with pytest.raises(ValueError, match='mix kind'):
        mixing.mix_batch(jax.random.key(0), x, xo, kind='manifold', alpha=1.0)


def test_shape_mismatch_is_refused():
    x, xo = images()
    with pytest.raises(ValueError, match='same shape'):
        mixing.mixup(x, xo[:3], 0.5)
    with pytest.raises(ValueError, match='same shape'):
        mixing.cutmix(jax.random.key(0), x, xo[:3], 0.5)
