"""Each loss term against an independent float64 numpy reference, plus a hand-worked total."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp as np_logsumexp

from lmoe_jax import losses as L

# ------------------------------------------------------------------ numpy references (float64)


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - np_logsumexp(z, axis=-1, keepdims=True)


def np_ce(z, y):
    return -np.mean(np_log_softmax(z)[np.arange(len(y)), y])


def np_soft_ce(z, t):
    return np.mean(-np.sum(np.asarray(t, np.float64) * np_log_softmax(z), axis=-1))


def np_target(y, lam, k):
    lam = np.broadcast_to(np.asarray(lam, np.float64), (len(y),))[:, None]
    return lam * np.eye(k)[y] + (1 - lam) / k


def np_lmix(z, zo, lam):
    lam = np.broadcast_to(np.asarray(lam, np.float64), (len(z),))[:, None]
    return lam * np.asarray(z, np.float64) + (1 - lam) * np.asarray(zo, np.float64)


def np_oe(zo):
    k = zo.shape[-1]
    return np_soft_ce(zo, np.full(zo.shape, 1.0 / k))


def np_energy_oe(z, zo, m_in, m_out):
    e_in, e_out = -np_logsumexp(np.float64(z), axis=-1), -np_logsumexp(np.float64(zo), axis=-1)
    return np.mean(np.maximum(e_in - m_in, 0) ** 2) + np.mean(np.maximum(m_out - e_out, 0) ** 2)


def np_consistency(zm, zl, kind):
    zm, zl = np.float64(zm), np.float64(zl)
    if kind == 'mse':
        return np.mean((zm - zl) ** 2)
    lp, lq = np_log_softmax(zl), np_log_softmax(zm)
    return np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1))


def as_f64(x):
    """The values the loss really sees (bf16-rounded when given bf16), in float64."""
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


CASES = [(2, 1, jnp.float32), (10, 7, jnp.float32), (200, 16, jnp.float32),
         (10, 8, jnp.bfloat16), (37, 5, jnp.float16)]


def make(k, b, dtype, seed=0, per_example=False):
    rng = np.random.default_rng(seed + 31 * k + b)
    z = jnp.asarray(rng.normal(0, 3, (b, k)), dtype)
    zo = jnp.asarray(rng.normal(0, 3, (b, k)), dtype)
    zm = jnp.asarray(rng.normal(0, 3, (b, k)), dtype)
    y = rng.integers(0, k, b)
    lam = rng.uniform(0, 1, b) if per_example else rng.uniform()
    return z, zo, zm, y, np.float32(lam)


# ------------------------------------------------------------------ each term


@pytest.mark.parametrize('k,b,dtype', CASES)
@pytest.mark.parametrize('per_example', [False, True])
def test_terms_match_numpy(k, b, dtype, per_example):
    z, zo, zm, y, lam = make(k, b, dtype, per_example=per_example)
    zf, zof, zmf = as_f64(z), as_f64(zo), as_f64(zm)
    lam64 = np.float64(lam)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(L.cross_entropy(logits=z, labels=y), np_ce(zf, y), **tol)
    t = L.mixture_target(labels=y, lam=lam, num_classes=k)
    np.testing.assert_allclose(t, np_target(y, lam64, k), **tol)
    np.testing.assert_allclose(np.sum(t, -1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(L.soft_cross_entropy(logits=zm, targets=t),
                               np_soft_ce(zmf, np_target(y, lam64, k)), **tol)
    zl = L.logit_mixture(logits_id=z, logits_ood=zo, lam=lam)
    assert zl.dtype == jnp.float32
    np.testing.assert_allclose(zl, np_lmix(zf, zof, lam64), **tol)
    np.testing.assert_allclose(L.oe_loss(logits_ood=zo), np_oe(zof), **tol)
    np.testing.assert_allclose(L.energy_oe_loss(logits_id=z, logits_ood=zo, m_in=-5.0, m_out=-1.0),
                               np_energy_oe(zf, zof, -5.0, -1.0), rtol=2e-5, atol=1e-4)
    for kind in ('mse', 'kl'):
        np.testing.assert_allclose(
            L.consistency_loss(logits_mix=zm, logits_lmix=zl, kind=kind),
            np_consistency(zmf, np_lmix(zf, zof, lam64), kind), rtol=2e-5, atol=1e-4)


@pytest.mark.parametrize('k,b,dtype', CASES)
def test_oe_family_total_is_weighted_sum_of_numpy_terms(k, b, dtype):
    z, zo, zm, y, lam = make(k, b, dtype, seed=3)
    zf, zof, zmf = as_f64(z), as_f64(zo), as_f64(zm)
    w = L.LossWeights(id=1.0, oe=0.5, energy=0.1, input_mix=2.0, logit_mix=3.0, consistency=4.0,
                      m_in=-7.0, m_out=-2.0)
    total, terms = jax.jit(L.oe_family_loss)(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y,
                                             lam=lam, weights=w)
    t = np_target(y, np.float64(lam), k)
    ref = {
        'id': np_ce(zf, y), 'oe': np_oe(zof), 'energy': np_energy_oe(zf, zof, -7.0, -2.0),
        'input_mix': np_soft_ce(zmf, t), 'logit_mix': np_soft_ce(np_lmix(zf, zof, lam), t),
        'consistency': np_consistency(zmf, np_lmix(zf, zof, lam), 'mse'),
    }
    assert set(terms) == set(L.TERM_NAMES)
    for name, value in ref.items():
        np.testing.assert_allclose(terms[name], value, rtol=5e-5, atol=1e-4, err_msg=name)
    ref_total = (ref['id'] + 0.5 * ref['oe'] + 0.1 * ref['energy'] + 2 * ref['input_mix']
                 + 3 * ref['logit_mix'] + 4 * ref['consistency'])
    np.testing.assert_allclose(total, ref_total, rtol=5e-5, atol=1e-3)
    assert total.dtype == jnp.float32


def test_hand_worked_total():
    """K=2, B=1; values worked out on paper (see comments)."""
    l3 = math.log(3.0)
    z = jnp.array([[l3, 0.0]])       # softmax (3/4, 1/4)
    zo = jnp.array([[0.0, 0.0]])     # softmax (1/2, 1/2)
    zm = jnp.array([[0.0, l3]])      # softmax (1/4, 3/4)
    y = np.array([0])
    lam = 0.5                        # target (3/4, 1/4); logit mixture (ln3/2, 0)
    w = L.LossWeights(id=1.0, oe=0.5, energy=0.1, input_mix=2.0, logit_mix=3.0, consistency=4.0,
                      m_in=-2.0, m_out=0.0)
    total, terms = L.oe_family_loss(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=lam,
                                    weights=w)
    expect = {
        'id': math.log(4 / 3),
        'oe': math.log(2),
        # E(z) = -ln4 -> relu(2 - ln4)^2 ; E(z~) = -ln2 -> relu(0 + ln2)^2
        'energy': (2 - math.log(4)) ** 2 + math.log(2) ** 2,
        # -(3/4 ln(1/4) + 1/4 ln(3/4))
        'input_mix': math.log(4) - 0.25 * l3,
        # softmax(ln sqrt3, 0) = (sqrt3, 1)/(1+sqrt3)
        'logit_mix': math.log(1 + math.sqrt(3)) - 3 / 8 * l3,
        # mean((0 - ln3/2)^2, (ln3 - 0)^2)
        'consistency': 5 / 8 * l3 ** 2,
    }
    for name, value in expect.items():
        np.testing.assert_allclose(terms[name], value, rtol=1e-6, err_msg=name)
    expect_total = (expect['id'] + 0.5 * expect['oe'] + 0.1 * expect['energy']
                    + 2 * expect['input_mix'] + 3 * expect['logit_mix'] + 4 * expect['consistency'])
    np.testing.assert_allclose(total, expect_total, rtol=1e-6)


# ------------------------------------------------------------------ edge cases


def test_lam_one_reduces_input_mix_to_cross_entropy():
    z, zo, zm, y, _ = make(10, 6, jnp.float32)
    _, terms = L.oe_family_loss(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=1.0,
                                weights=L.LossWeights())
    np.testing.assert_allclose(terms['input_mix'], np_ce(as_f64(zm), y), rtol=1e-6)
    np.testing.assert_allclose(terms['logit_mix'], np_ce(as_f64(z), y), rtol=1e-6)


def test_oe_closed_form_and_minimum_at_uniform_logits():
    k = 7
    zo = jnp.zeros((3, k))
    np.testing.assert_allclose(L.oe_loss(logits_ood=zo), math.log(k), rtol=1e-6)
    # any non-constant row costs more than log K (Gibbs' inequality)
    zo2 = zo.at[0, 0].set(2.0)
    assert float(L.oe_loss(logits_ood=zo2)) > math.log(k)


def test_consistency_is_zero_when_mixed_logits_equal_logit_mixture():
    z, zo, _, _, lam = make(10, 5, jnp.float32)
    zl = L.logit_mixture(logits_id=z, logits_ood=zo, lam=lam)
    for kind in ('mse', 'kl'):
        assert float(L.consistency_loss(logits_mix=zl, logits_lmix=zl, kind=kind)) == pytest.approx(
            0.0, abs=1e-6)


def test_energy_loss_is_zero_inside_margins():
    z = jnp.full((4, 5), 20.0)    # E = -(20 + ln5) < m_in = -13
    zo = jnp.full((4, 5), -10.0)  # E = 10 - ln5 > m_out = -6
    assert float(L.energy_oe_loss(logits_id=z, logits_ood=zo)) == 0.0


def test_zero_weight_terms_are_reported_but_cost_nothing():
    z, zo, zm, y, lam = make(10, 4, jnp.float32)
    total, terms = L.oe_family_loss(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=lam,
                                    weights=L.LossWeights())
    assert set(terms) == set(L.TERM_NAMES) and all(float(v) > 0 for v in terms.values())
    np.testing.assert_allclose(total, np_ce(as_f64(z), y), rtol=1e-6)


def test_missing_logits_allowed_only_when_unweighted():
    z, zo, zm, y, lam = make(10, 4, jnp.float32)
    total, terms = L.oe_family_loss(logits_id=z, logits_ood=None, logits_mix=None, labels=y,
                                    lam=lam, weights=L.LossWeights())
    assert set(terms) == {'id'}
    with pytest.raises(ValueError, match='logits_ood is None'):
        L.oe_family_loss(logits_id=z, logits_ood=None, logits_mix=zm, labels=y, lam=lam,
                         weights=L.LossWeights(logit_mix=1.0))
    with pytest.raises(ValueError, match='logits_mix is None'):
        L.oe_family_loss(logits_id=z, logits_ood=zo, logits_mix=None, labels=y, lam=lam,
                         weights=L.LossWeights(consistency=1.0))


# ------------------------------------------------------------------ gradients


def _fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


@pytest.mark.parametrize('kind', ['mse', 'kl'])
def test_gradient_matches_finite_differences_of_numpy_reference(kind):
    k, b = 5, 3
    z, zo, zm, y, lam = make(k, b, jnp.float32, seed=11)
    zf, zof, zmf = as_f64(z), as_f64(zo), as_f64(zm)
    w = L.LossWeights(oe=0.5, energy=0.1, input_mix=2.0, logit_mix=3.0, consistency=4.0,
                      m_in=-3.0, m_out=-1.0, consistency_kind=kind)
    t = np_target(y, np.float64(lam), k)

    def np_total(a, o, m):
        lm = np_lmix(a, o, lam)
        return (np_ce(a, y) + 0.5 * np_oe(o) + 0.1 * np_energy_oe(a, o, -3.0, -1.0)
                + 2 * np_soft_ce(m, t) + 3 * np_soft_ce(lm, t) + 4 * np_consistency(m, lm, kind))

    def jax_total(a, o, m):
        return L.oe_family_loss(logits_id=a, logits_ood=o, logits_mix=m, labels=y, lam=lam,
                                weights=w)[0]

    grads = jax.jit(jax.grad(jax_total, argnums=(0, 1, 2)))(z, zo, zm)
    ref = (_fd_grad(lambda a: np_total(a, zof, zmf), zf),
           _fd_grad(lambda o: np_total(zf, o, zmf), zof),
           _fd_grad(lambda m: np_total(zf, zof, m), zmf))
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4)


def test_stop_gradient_sides():
    z, zo, zm, _, lam = make(6, 4, jnp.float32, seed=5)
    zl = L.logit_mixture(logits_id=z, logits_ood=zo, lam=lam)

    def grads(side):
        f = lambda m, l: L.consistency_loss(logits_mix=m, logits_lmix=l, stop_gradient=side)
        return jax.grad(f, argnums=(0, 1))(zm, zl)

    gm, gl = grads('none')
    # MSE: d/dm mean((m-l)^2) = 2(m-l)/N, and the opposite for l
    np.testing.assert_allclose(gm, 2 * (as_f64(zm) - as_f64(zl)) / zm.size, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gl, -gm, rtol=1e-6)
    gm, gl = grads('mixed_input')
    assert not np.any(gm) and np.any(gl)
    gm, gl = grads('logit_mixture')
    assert np.any(gm) and not np.any(gl)


def test_jit_and_grad_from_a_notebook():
    """The README's notebook usage: plain jax.jit of the loss and a jax.grad through a wrapper."""
    z, zo, zm, y, lam = make(10, 4, jnp.float32)
    w = L.get_method('lmoe').weights
    f = jax.jit(L.oe_family_loss)
    total, _ = f(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=lam, weights=w)
    g = jax.grad(lambda a: f(logits_id=a, logits_ood=zo, logits_mix=zm, labels=y, lam=lam,
                             weights=w)[0])(z)
    assert np.isfinite(float(total)) and g.shape == z.shape and np.all(np.isfinite(g))
    # weights are leaves: a new weight value reuses the compiled program
    compiled = f._cache_size()
    f(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=lam,
      weights=w.replace(logit_mix=1.0))
    assert f._cache_size() == compiled


# ------------------------------------------------------------------ bad input


def test_labels_out_of_range_raise_eagerly_and_give_nan_under_jit():
    z = jnp.zeros((3, 4))
    for bad in ([0, 4, 1], [-1, 0, 0]):
        with pytest.raises(ValueError, match=r'labels must lie in \[0, 4\)'):
            L.cross_entropy(logits=z, labels=np.array(bad))
        with pytest.raises(ValueError, match='labels must lie'):
            L.mixture_target(labels=np.array(bad), lam=0.5, num_classes=4)
        assert np.isnan(float(jax.jit(lambda l: L.cross_entropy(logits=z, labels=l))(
            jnp.array(bad))))


def test_lam_out_of_range_raises():
    with pytest.raises(ValueError, match='lam must lie'):
        L.mixture_target(labels=np.array([0]), lam=1.5, num_classes=3)


def test_bad_consistency_settings_raise():
    z = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match='consistency kind'):
        L.consistency_loss(logits_mix=z, logits_lmix=z, kind='l1')
    with pytest.raises(ValueError, match='stop_gradient'):
        L.consistency_loss(logits_mix=z, logits_lmix=z, stop_gradient='both')


# ------------------------------------------------------------------ presets


def test_presets_hold_the_mixoe_benchmark_values():
    oe = L.get_method('oe')
    assert float(oe.weights.oe) == 1.0 and not oe.needs_mix and oe.needs_ood
    en = L.get_method('energy_oe')
    assert (float(en.weights.energy), float(en.weights.m_in), float(en.weights.m_out)) == (
        0.1, -13.0, -6.0)
    mu = L.get_method('mixoe_mixup')
    assert (mu.mix, mu.alpha, float(mu.weights.input_mix)) == ('mixup', 1.0, 5.0)
    assert mu.needs_mix and not mu.needs_ood
    cm = L.get_method('mixoe_cutmix')
    assert (cm.mix, cm.alpha, float(cm.weights.input_mix)) == ('cutmix', 2.0, 5.0)
    lm = L.get_method('lmoe')
    assert (float(lm.weights.logit_mix), float(lm.weights.consistency),
            float(lm.weights.input_mix), lm.weights.consistency_kind, lm.alpha) == (
                5.0, 0.1, 0.0, 'mse', 1.0)  # consistency 0.1: docs/comparison.md's selection
    assert lm.needs_mix and lm.needs_ood
    base = L.get_method('baseline')
    assert not (base.needs_mix or base.needs_ood or base.needs_lam)


def test_get_method_overrides_and_errors():
    m = L.get_method('lmoe', {'consistency': 0.0, 'input_mix': 1.0, 'alpha': 2.0, 'oe': None})
    assert float(m.weights.consistency) == 0.0 and float(m.weights.input_mix) == 1.0
    assert m.alpha == 2.0 and float(m.weights.logit_mix) == 5.0
    with pytest.raises(ValueError, match='unknown method .*valid methods: baseline'):
        L.get_method('mixup_oe')
    with pytest.raises(ValueError, match='must be >= 0'):
        L.get_method('oe', {'oe': -1.0})
    with pytest.raises(ValueError, match='unknown loss setting'):
        L.get_method('oe', {'gamma': 1.0})
    with pytest.raises(ValueError, match='mix must be one of'):
        L.get_method('oe', {'mix': 'manifold'})


def test_a_zero_weight_term_cannot_poison_the_total():
    """An unused term that overflows (huge outlier energies) leaves the total untouched."""
    z, zo, zm, y, lam = make(10, 4, jnp.float32)
    w = L.LossWeights(m_in=float('nan'))  # energy term becomes NaN; its weight is 0
    total, terms = jax.jit(L.oe_family_loss)(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y,
                                             lam=lam, weights=w)
    assert np.isnan(float(terms['energy']))
    np.testing.assert_allclose(total, np_ce(as_f64(z), y), rtol=1e-6)


# ------------------------------------------------------------------ variants of issue 21 (margin cap)

ORIGINAL_PRESETS = ('baseline', 'oe', 'energy_oe', 'mixoe_mixup', 'mixoe_cutmix', 'lmoe')


def np_total_of(w, y, lam, a, o, m, lmix_id=None):
    """The documented objective in float64; ``lmix_id`` replaces the ID logits inside the logit
    mixture (the stop-gradient variant holds them at their value there)."""
    t = np_target(y, np.float64(lam), a.shape[-1])
    lm = np_lmix(a if lmix_id is None else lmix_id, o, lam)
    return (float(w.id) * np_ce(a, y) + float(w.oe) * np_oe(o)
            + float(w.energy) * np_energy_oe(a, o, float(w.m_in), float(w.m_out))
            + float(w.input_mix) * np_soft_ce(m, t) + float(w.logit_mix) * np_soft_ce(lm, t)
            + float(w.consistency) * np_consistency(m, lm, w.consistency_kind))


@pytest.mark.parametrize('name', list(L.PRESETS))
def test_every_preset_jitted_matches_the_numpy_objective(name):
    """Value and gradients of each preset (the original six unchanged by the new switch, and the
    new ones) against the float64 reference; the stop-gradient presets' ID gradient against finite
    differences with the mixture's ID logits held fixed. Tolerances as in the gradient test above
    (float32 loss vs float64 central differences with eps 1e-6)."""
    w = L.get_method(name).weights
    if name in ORIGINAL_PRESETS:
        assert w.logit_mix_stop_id is False
    k, b = 6, 3
    z, zo, zm, y, lam = make(k, b, jnp.float32, seed=13)
    zf, zof, zmf = as_f64(z), as_f64(zo), as_f64(zm)
    fixed = zf if w.logit_mix_stop_id else None

    def jax_total(a, o, m):
        return L.oe_family_loss(logits_id=a, logits_ood=o, logits_mix=m, labels=y, lam=lam,
                                weights=w)[0]

    value = jax.jit(jax_total)(z, zo, zm)
    np.testing.assert_allclose(value, np_total_of(w, y, lam, zf, zof, zmf), rtol=5e-5, atol=1e-4)
    grads = jax.jit(jax.grad(jax_total, argnums=(0, 1, 2)))(z, zo, zm)
    ref = (_fd_grad(lambda a: np_total_of(w, y, lam, a, zof, zmf, fixed), zf),
           _fd_grad(lambda o: np_total_of(w, y, lam, zf, o, zmf), zof),
           _fd_grad(lambda m: np_total_of(w, y, lam, zf, zof, m), zmf))
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-4)


def test_stop_id_removes_the_logit_mixture_gradient_on_the_id_logits():
    """logit_mix alone with the ID side stopped: same value, zero gradient on z, and on z~ the
    analytic (1-lam)(softmax(z_lmix) - t)/B; without the stop, z gets lam(softmax(z_lmix) - t)/B."""
    k, b = 7, 4
    z, zo, zm, y, lam = make(k, b, jnp.float32, seed=17, per_example=True)
    zf, zof = as_f64(z), as_f64(zo)
    lam64 = np.asarray(lam, np.float64)[:, None]
    zl = np_lmix(zf, zof, lam64[:, 0])
    resid = np.exp(np_log_softmax(zl)) - np_target(y, lam64[:, 0], k)

    def f(a, o, stop):
        w = L.LossWeights(id=0.0, logit_mix=1.0, logit_mix_stop_id=stop)
        return L.oe_family_loss(logits_id=a, logits_ood=o, logits_mix=None, labels=y, lam=lam,
                                weights=w)[0]

    for stop in (False, True):
        value = jax.jit(f, static_argnums=2)(z, zo, stop)
        np.testing.assert_allclose(value, np_soft_ce(zl, np_target(y, lam64[:, 0], k)), rtol=2e-5)
        gz, go = jax.grad(f, argnums=(0, 1))(z, zo, stop)
        np.testing.assert_allclose(go, (1 - lam64) * resid / b, rtol=1e-4, atol=1e-7)
        if stop:
            assert not np.any(np.asarray(gz))
        else:
            np.testing.assert_allclose(gz, lam64 * resid / b, rtol=1e-4, atol=1e-7)


def test_stop_id_leaves_only_the_cross_entropy_gradient_on_the_id_logits():
    """lmoe_sg / logit_mixoe_sg: d total / d z is exactly CE's (softmax(z) - onehot)/B."""
    k, b = 5, 6
    z, zo, zm, y, lam = make(k, b, jnp.float32, seed=19)
    ce_grad = (np.exp(np_log_softmax(as_f64(z))) - np.eye(k)[y]) / b
    for name in ('lmoe_sg', 'logit_mixoe_sg'):
        w = L.get_method(name).weights
        g = jax.grad(lambda a: L.oe_family_loss(logits_id=a, logits_ood=zo, logits_mix=zm,
                                                labels=y, lam=lam, weights=w)[0])(z)
        np.testing.assert_allclose(g, ce_grad, rtol=1e-5, atol=1e-7, err_msg=name)


def test_new_presets_and_the_switch_through_the_config_layer():
    import configs.default as default_config
    lm, lmx = L.get_method('lmoe').weights, L.get_method('logit_mixoe').weights
    assert (float(lmx.input_mix), float(lmx.logit_mix), float(lmx.consistency)) == (5.0, 5.0, 0.1)
    assert not lmx.logit_mix_stop_id and L.get_method('logit_mixoe').needs_mix
    assert L.get_method('lmoe_sg').weights == lm.replace(logit_mix_stop_id=True)
    assert L.get_method('logit_mixoe_sg').weights == lmx.replace(logit_mix_stop_id=True)
    assert L.get_method('mixoe_mixup', {'logit_mix_stop_id': np.bool_(True)}).weights \
        .logit_mix_stop_id is True
    for bad in ('yes', 1, 0.0):
        with pytest.raises(ValueError, match='logit_mix_stop_id must be True or False'):
            L.get_method('lmoe', {'logit_mix_stop_id': bad})
    # the config file's knob reaches the method as the trainer resolves it
    config = default_config.get_config()
    assert config.loss.logit_mix_stop_id is None  # None = keep the preset's value
    assert not L.get_method(config.method, config.loss.to_dict()).weights.logit_mix_stop_id
    config.loss.logit_mix_stop_id = True
    assert L.get_method(config.method, config.loss.to_dict()).weights.logit_mix_stop_id is True
    config.method, config.loss.logit_mix_stop_id = 'lmoe_sg', False
    assert L.get_method(config.method, config.loss.to_dict()).weights.logit_mix_stop_id is False


def test_stop_id_is_static_and_weights_stay_traced():
    """The switch changes the program (retrace); a weight change under it still does not.
    (Shapes no other test uses: jit caches of one function are shared between jit wrappers.)"""
    z, zo, zm, y, lam = make(11, 3, jnp.float32)
    f = jax.jit(L.oe_family_loss)
    w = L.get_method('lmoe_sg').weights
    f(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=lam, weights=w)
    n = f._cache_size()
    f(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=lam, weights=w.replace(logit_mix=2.))
    assert f._cache_size() == n
    f(logits_id=z, logits_ood=zo, logits_mix=zm, labels=y, lam=lam,
      weights=w.replace(logit_mix_stop_id=False))
    assert f._cache_size() == n + 1
