"""benchmarks/margin_cap.py: the optimal clean-ID margin of each objective, against references
computed here independently (scipy quad + brentq, numpy grids), and against training the
project's own loss on free logits."""
import math
import os
import sys

import numpy as np
import pytest
from scipy import integrate, optimize, special

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), 'benchmarks'))
import margin_cap as mc  # noqa: E402


def np_label_prob(u, k):
    """softmax(u*e_y)_y = e^u / (e^u + K - 1)."""
    return 1.0 / (1.0 + (k - 1) * np.exp(-np.asarray(u, np.float64)))


def beta_expectation(f, alpha):
    """E[f(lam)], lam ~ Beta(alpha, alpha), by QUADPACK's algebraic-weight rule (handles the
    endpoint singularity of alpha < 1 exactly)."""
    value, _ = integrate.quad(f, 0.0, 1.0, weight='alg', wvar=(alpha - 1.0, alpha - 1.0),
                              epsabs=1e-13, epsrel=1e-12, limit=200)
    return value / special.beta(alpha, alpha)


@pytest.mark.parametrize('k', [6, 200])
@pytest.mark.parametrize('alpha', [0.5, 1.0, 2.0])
def test_logit_mix_alone_solves_its_first_order_condition(k, alpha):
    """d/dm E[SoftCE(lam*m*e_y, t)] = E[lam*(s(lam m) - t)] = 0, i.e.
    E[lam*s(lam*m)] = (1 - 1/K) E[lam^2] + E[lam]/K, solved by brentq with quad expectations.
    Tolerance: quad is accurate to ~1e-12 and Gauss-Jacobi (64 nodes) on this smooth integrand
    to far better, so 1e-6 on m is loose."""
    e_lam2 = beta_expectation(lambda x: x * x, alpha)
    rhs = (1 - 1 / k) * e_lam2 + 0.5 / k
    m_ref = optimize.brentq(
        lambda m: beta_expectation(lambda x: x * np_label_prob(x * m, k), alpha) - rhs, 0.1, 100.0,
        xtol=1e-12)
    got = mc.optimum(mc.objective('logit_mix_alone'), k, alpha)
    assert got['margin'] == pytest.approx(m_ref, abs=1e-6)
    assert got['margin_foc'] == pytest.approx(m_ref, abs=1e-6)
    assert got['logodds'] == pytest.approx(m_ref - math.log(k - 1), abs=1e-6)


def test_the_issue_quick_model_is_reproduced():
    """The issue's numbers (2 decimals) for logit mixing alone, lam ~ U(0, 1)."""
    for k, value in mc.ISSUE_QUICK_MODEL.items():
        got = mc.optimum(mc.objective('logit_mix_alone'), k, 1.0)['logodds']
        assert abs(got - value) <= 0.005 + 1e-9, (k, got, value)


def test_lmoe_optimum_matches_a_brute_force_grid():
    """CE + 5 logit_mix (lmoe: its consistency is 0 at the optimum, the mixed logits being free)
    on a grid of m (step 1e-3), the expectation over lam ~ U(0, 1) by a 20000-point midpoint
    rule. Tolerance: half the grid step + the midpoint rule's error (~1e-8) -> 1e-3."""
    k = 10
    lam = (np.arange(20000) + 0.5) / 20000
    t = lam + (1 - lam) / k

    def total(m):
        lm = np.logaddexp(lam * m, np.log(k - 1)) - t * lam * m
        return np.logaddexp(m, np.log(k - 1)) - m + 5.0 * lm.mean()

    grid = np.arange(0.0, 15.0, 1e-3)
    m_ref = grid[np.argmin([total(m) for m in grid])]
    got = mc.optimum(mc.objective('lmoe'), k, 1.0)
    assert got['margin'] == pytest.approx(m_ref, abs=1e-3)
    assert got['margin_foc'] == pytest.approx(got['margin'], abs=1e-6)  # two solvers agree


def test_logit_mixoe_coupled_optimum_matches_nested_numpy_search():
    """input_mix 5 + logit_mix 5 + consistency 0.1 couple m and the mixed logits d(lam); here
    each d is found by golden-section search of its convex per-lam objective, m by a grid, the
    expectation over Beta(2, 2) by a 4000-point midpoint rule with the density as weights.
    Tolerance: grid step 2e-3 / 2 plus quadrature error -> 2e-3."""
    k, alpha = 6, 2.0
    lam = (np.arange(4000) + 0.5) / 4000
    w = lam ** (alpha - 1) * (1 - lam) ** (alpha - 1)
    w /= w.sum()
    t = lam + (1 - lam) / k
    ell = np.log(k - 1)

    def inner(d, m):
        return (5.0 * (np.logaddexp(d, ell) - t * d) + 0.1 * (d - lam * m) ** 2 / k)

    def best_d(m):
        lo, hi = np.full_like(lam, -20.0), np.full_like(lam, 40.0)
        g = (math.sqrt(5) - 1) / 2
        for _ in range(90):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            left = inner(a, m) < inner(b, m)
            hi, lo = np.where(left, b, hi), np.where(left, lo, a)
        return (lo + hi) / 2

    def total(m):
        d = best_d(m)
        lm = np.logaddexp(lam * m, ell) - t * lam * m
        return np.logaddexp(m, ell) - m + np.sum(w * (5.0 * lm + inner(d, m)))

    coarse = np.arange(0.0, 12.0, 0.05)
    m0 = coarse[np.argmin([total(m) for m in coarse])]
    fine = np.arange(m0 - 0.1, m0 + 0.1, 2e-3)
    m_ref = fine[np.argmin([total(m) for m in fine])]
    got = mc.optimum(mc.objective('logit_mixoe'), k, alpha)
    assert got['margin'] == pytest.approx(m_ref, abs=2e-3)
    assert got['margin_foc'] == pytest.approx(got['margin'], abs=1e-5)


def test_uncapped_objectives():
    """MixOE on the free network and the stop-gradient variants: no finite optimum. For MixOE
    the reduced objective CE(m) + const is strictly decreasing in m (checked here in numpy); the
    stop-gradient variants move m by the cross-entropy's gradient alone (tests/test_losses.py
    checks that gradient on the real loss)."""
    k = 6
    ms = np.linspace(0, 50, 501)
    d_ce = -(k - 1) / (np.exp(ms) + k - 1)  # d/dm [log(e^m + K-1) - m]
    assert np.all(d_ce < 0)
    for name in ('baseline', 'mixoe_mixup', 'lmoe_sg', 'logit_mixoe_sg'):
        assert not mc.objective(name).capped
        assert math.isinf(mc.optimum(mc.objective(name), k, 1.0)['margin'])
    for name in ('lmoe', 'logit_mixoe', 'logit_mix_alone'):
        assert mc.objective(name).capped


def test_rigidity_interpolates_between_free_and_linear_network():
    """MixOE with a stiff mixing path: rho -> inf gives the linear network, where input mixup
    equals the logit mixture, i.e. CE + 5 logit_mix (solved by another code path); the cap falls
    as rho grows."""
    k = 6
    curve = mc.rigidity_curve(k, 1.0, [0.1, 10.0, 1e3, 1e6])
    assert all(a > b for a, b in zip(curve, curve[1:])), curve
    linear = mc.optimum(mc.Objective('ce+5lm', logit_mix=5.0), k, 1.0)['logodds']
    assert curve[-1] == pytest.approx(linear, abs=2e-3)


def test_large_k_leading_order():
    """The step-function limit of s(lam*m): the log-odds over its leading order (1/r - 1) ln(K-1)
    tends to 1 (the correction is O(1) against a term growing like ln K)."""
    ratios = [mc.optimum(mc.objective('logit_mix_alone'), int(k), 1.0)['logodds']
              / mc.asymptotic_logodds(1.0, int(k)) for k in (1e3, 1e8, 1e16)]
    assert ratios[0] > ratios[1] > ratios[2] > 1.0
    assert ratios[2] < 1.01


def test_free_logit_descent_through_the_project_loss_reaches_the_prediction():
    """Adam on unrestricted logits with lmoe_jax.losses.oe_family_loss (the code the trainer
    runs) ends at the margin the numpy/scipy analysis predicts with the same quadrature. Adam's
    final steps are 1e-4 (cosine to 1e-3 of lr 0.1): 2e-3 on the log-odds is ample."""
    k, nodes = 6, 8
    got = mc.free_logit_descent('lmoe', k, 1.0, steps=1200, n_nodes=nodes)
    pred = mc.optimum(mc.objective('lmoe'), k, 1.0, n_nodes=nodes)['logodds']
    assert got['logodds'] == pytest.approx(pred, abs=2e-3)
    assert got['logodds_spread'] < 1e-3  # every class at the same margin (the symmetric optimum)


def test_stop_id_trains_the_clean_logits_exactly_as_cross_entropy_alone():
    """With logit_mix_stop_id the ID logits receive the cross-entropy gradient only, so Adam moves
    them as in the baseline (identical up to float32 rounding of a differently fused program)."""
    base = mc.free_logit_descent('baseline', 4, 1.0, steps=300, n_nodes=4)
    sg = mc.free_logit_descent('lmoe_sg', 4, 1.0, steps=300, n_nodes=4)
    lm = mc.free_logit_descent('lmoe', 4, 1.0, steps=300, n_nodes=4)
    assert sg['margin'] == pytest.approx(base['margin'], rel=1e-5)
    assert sg['margin'] > sg['margin_at_half'] + 0.1  # still growing: no cap
    assert lm['margin'] < base['margin'] - 1.0  # the control: without the stop, the cap bites
