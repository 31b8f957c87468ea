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
    cut = jax.jit(mixing.mix_batch, static_argnames=('kind', 'alpha', 'per_example'))
    for i in range(40):
        mixed, lam_exact = cut(jax.random.key(i), x, xo, kind='cutmix', alpha=1.0,
                               per_example=per_example)
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
            np.testing.assert_array_equal(np.asarray(mixed)[j][~box[j]], np.asarray(x)[j][~box[j]])
            np.testing.assert_array_equal(np.asarray(mixed)[j][box[j]], np.asarray(xo)[j][box[j]])
        if not per_example:  # one box shared by the batch, as MixOE does
            assert all(np.array_equal(box[0], box[j]) for j in range(b))


def test_cutmix_box_side_follows_the_cutmix_rule():
    """Side at most floor(size * sqrt(1 - lam)) (MixOE / CutMix), clipped at the border."""
    h, w = 12, 10
    for i in range(40):
        lam = jax.random.uniform(jax.random.key(1000 + i), (6,))
        mask, lam_exact = mixing.cutmix_box(jax.random.key(i), lam, h, w)
        for m, lam_j, exact_j in zip(np.asarray(mask), np.asarray(lam), np.asarray(lam_exact)):
            rows, cols = np.where(m.any(1))[0], np.where(m.any(0))[0]
            assert len(rows) <= math.floor(h * math.sqrt(1 - lam_j))
            assert len(cols) <= math.floor(w * math.sqrt(1 - lam_j))
            assert exact_j == pytest.approx(1 - m.sum() / (h * w))


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
    a, b, c = (mixing.mix_batch(jax.random.key(k), x, xo, kind='cutmix', alpha=1.0)
               for k in (7, 7, 8))
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
    np.testing.assert_array_equal(l1, l2)
    assert l1.shape == (6,) and m1.shape == x.shape
    with pytest.raises(ValueError, match='mix kind'):
        mixing.mix_batch(jax.random.key(0), x, xo, kind='manifold', alpha=1.0)


def test_mix_batch_mixup_is_mixup_of_its_lam_and_lam_only_draws_the_same_lam():
    """x_mix = lam*x + (1-lam)*x~ for the lam it returns (numpy); kind=None gives that lam alone."""
    x, xo = images()
    mixed, lam = mixing.mix_batch(jax.random.key(5), x, xo, kind='mixup', alpha=0.4,
                                  per_example=True)
    lam_b = np.float64(lam).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(mixed, lam_b * np.float64(x) + (1 - lam_b) * np.float64(xo),
                               rtol=1e-6)
    none, lam_only = mixing.mix_batch(jax.random.key(5), x, xo, kind=None, alpha=0.4,
                                      per_example=True)
    assert none is None
    np.testing.assert_array_equal(lam_only, lam)


@pytest.mark.parametrize('kind', ['mixup', 'cutmix'])
def test_mix_batch_is_the_same_per_example_on_one_device_under_pmap_and_on_a_mesh(kind):
    """The step's draw does not depend on the device layout (see ``mix_batch``).

    The same threefry bits and the same Beta sampler run on every device, so lam and the box are
    bitwise the same; a mixup pixel is one multiply-add of them, so equal up to an ulp (rtol
    2**-23 covers the fused and unfused forms of ``lam*a + (1-lam)*b`` with a, b in [0, 3)).
    """
    n = jax.local_device_count()
    x, xo = images(b=2 * n, h=8, w=8, c=1)
    kw = dict(kind=kind, alpha=1.0, per_example=True)
    ref_mix, ref_lam = mixing.mix_batch(jax.random.key(11), x, xo, **kw)

    shard = lambda a: a.reshape(n, 2, *a.shape[1:])
    pm_mix, pm_lam = jax.pmap(lambda a, b: mixing.mix_batch(jax.random.key(11), a, b,
                                                            axis_name='d', **kw),
                              axis_name='d')(shard(x), shard(xo))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    jit_mix, jit_lam = jax.jit(lambda a, b: mixing.mix_batch(jax.random.key(11), a, b, mesh=mesh,
                                                             **kw))(jax.device_put(x, spec),
                                                                    jax.device_put(xo, spec))
    for lam, mixed in ((np.asarray(pm_lam).reshape(-1), np.asarray(pm_mix).reshape(x.shape)),
                       (np.asarray(jit_lam), np.asarray(jit_mix))):
        np.testing.assert_array_equal(lam, ref_lam)
        np.testing.assert_allclose(mixed, ref_mix, rtol=2.0 ** -23, atol=0)
    assert len(set(np.asarray(ref_lam).tolist())) > 1  # one lam per example, not one shared


def test_shape_mismatch_is_refused():
    x, xo = images()
    with pytest.raises(ValueError, match='same shape'):
        mixing.mixup(x, xo[:3], 0.5)
    with pytest.raises(ValueError, match='same shape'):
        mixing.mix_batch(jax.random.key(0), x, xo[:3], kind='cutmix', alpha=1.0)
