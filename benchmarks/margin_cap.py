"""The cap on the clean ID margin: each OE-family objective's optimal margin, for any K and alpha.

Issue 21, item 2 (docs/comparison.md, "The margin cap"). One command:

    .venv/bin/python benchmarks/margin_cap.py

writes ``benchmarks/results/margin_cap.{json,txt}`` and ``docs/images/margin_cap.png``.

The model (the ideal network: every logit it may set independently is a free variable).
Clean ID logits of class y: ``z_y = a*1 + m*e_y`` (margin m); outlier logits ``z~ = c*1``; logits
of the mixed image of class y at lam: ``z^ = b*1 + d(lam)*e_y``; ``lam ~ Beta(alpha, alpha)``.
Every term is convex in the free logits and symmetric under a permutation of the classes, so
this symmetric form holds an optimum of the unrestricted problem. Softmax ignores the offsets
a, b, c; the MSE consistency does not, but b per lam zeroes its K-1 off-label entries, leaving
``(d - lam*m)^2 / K``. With ``l = ln(K-1)``, ``s(u) = sigmoid(u - l)`` (the label probability of
logits ``u*e_y``) and ``t(lam) = lam + (1-lam)/K`` (MixOE's target on the label):

    J(m, d) = w_id*CE(m) + E_lam[ w_lm*LM(lam*m) + w_im*IM(d) + w_c*(d - lam*m)^2/K ]
    CE(m) = log(e^m + K-1) - m,  LM(u) = IM(u) = log(e^u + K-1) - t(lam)*u

The MSP log-odds of a clean ID image is ``log(p_max/(1-p_max)) = m - ln(K-1)``. The stop-gradient
variants (``logit_mix_stop_id``) are no minimisation of J: m then moves by dCE/dm < 0 alone.

Checks against training: (i) optax on free logits through ``lmoe_jax.losses.oe_family_loss`` (the
project's own loss), (ii) a linear model and an MLP on scikit-learn digits with Fashion-MNIST
outliers, trained with the same loss and mixup.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import sys
import time

import numpy as np
from scipy import optimize, special

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lmoe_jax import losses  # noqa: E402  (numpy-only use here; jax loads lazily below)

KS = (6, 10, 50, 90, 100, 150, 200)
ALPHAS = (0.5, 1.0, 2.0)
#: the presets analysed, plus two references: logit mixing alone (the issue's quick model) and
#: cross-entropy alone.
OBJECTIVES = ('logit_mix_alone', 'baseline', 'mixoe_mixup', 'lmoe', 'logit_mixoe', 'lmoe_sg',
              'logit_mixoe_sg')
#: the issue's quick model (logit mixing alone, lam ~ U(0, 1)): MSP log-odds per K
ISSUE_QUICK_MODEL = {6: 2.50, 10: 2.67, 50: 3.51, 100: 3.94, 150: 4.19, 200: 4.38}
#: docs/comparison.md: ID test 99th percentile of the MSP log-odds on the demo (K = 6), 5 seeds
MEASURED_K6 = {'lmoe (consistency 1)': 3.91, 'mixoe_mixup': 5.08}
#: (preset, K, alpha) of check (i); baseline and lmoe_sg must train identical ID logits
FREE_LOGIT_CASES = [('lmoe', 6, 1.0), ('baseline', 6, 1.0), ('lmoe_sg', 6, 1.0),
                    ('logit_mixoe_sg', 6, 1.0), ('logit_mixoe', 6, 1.0), ('lmoe', 6, 0.5),
                    ('lmoe', 6, 2.0), ('lmoe', 50, 1.0), ('logit_mixoe', 50, 1.0),
                    ('lmoe', 200, 1.0)]
#: check (ii): digits classes 0..K-1, presets
NETWORK_KS = (6, 10)
NETWORK_METHODS = ('baseline', 'lmoe', 'mixoe_mixup', 'logit_mixoe', 'lmoe_sg', 'logit_mixoe_sg')
#: clean MSP log-odds at which the uncapped variants' mixed images are shown (a CE-trained level)
UNCAPPED_REFERENCE_LOGODDS = 6.0


# --------------------------------------------------------------------------------------------------
# The reduced objective
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Objective:
    """The weights the model needs (MSE consistency, mixup: the presets analysed)."""
    name: str
    id: float = 1.0
    input_mix: float = 0.0
    logit_mix: float = 0.0
    consistency: float = 0.0
    stop_id: bool = False

    @property
    def capped(self) -> bool:
        """A finite optimum margin exists: some term's m-gradient stays > 0 as m grows."""
        if self.stop_id:
            return False
        return self.logit_mix > 0 or (self.input_mix > 0 and self.consistency > 0)


def objective(name: str) -> Objective:
    """A preset's weights from ``lmoe_jax.losses.PRESETS`` (or one of the two references)."""
    if name == 'logit_mix_alone':
        return Objective(name, id=0.0, logit_mix=1.0)
    w = losses.get_method(name).weights
    if float(w.oe) or float(w.energy) or w.consistency_kind != 'mse' or w.stop_gradient != 'none':
        raise ValueError(f'{name}: the model covers id, input_mix, logit_mix and MSE consistency')
    return Objective(name, id=float(w.id), input_mix=float(w.input_mix),
                     logit_mix=float(w.logit_mix), consistency=float(w.consistency),
                     stop_id=bool(w.logit_mix_stop_id))


def beta_nodes(alpha: float, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Jacobi nodes and weights of Beta(alpha, alpha) on [0, 1] (weights sum to 1)."""
    x, w = special.roots_jacobi(n, alpha - 1.0, alpha - 1.0)
    return (x + 1.0) / 2.0, w / w.sum()


def label_prob(u, k: int):
    """Softmax probability of the label for logits ``u*e_y`` (the others 0)."""
    return special.expit(np.asarray(u, np.float64) - math.log(k - 1))


def soft_ce(u, t, k: int):
    """SoftCE of logits ``u*e_y`` against label mass t (the rest spread evenly)."""
    return np.logaddexp(u, math.log(k - 1)) - t * u


def target(lam, k: int):
    """MixOE's soft target on the label: ``lam + (1-lam)/K``."""
    return lam + (1.0 - lam) / k


def reduced_loss(m: float, d: np.ndarray, obj: Objective, k: int, lam: np.ndarray,
                 wq: np.ndarray) -> tuple[float, np.ndarray]:
    """J(m, d) and its gradient w.r.t. (m, d_1..d_Q); the gradient of the true J (no stop)."""
    t = target(lam, k)
    ce = obj.id * (np.logaddexp(m, math.log(k - 1)) - m)
    per = (obj.logit_mix * soft_ce(lam * m, t, k) + obj.input_mix * soft_ce(d, t, k)
           + obj.consistency * (d - lam * m) ** 2 / k)
    g_m = (-obj.id * special.expit(math.log(k - 1) - m)  # dCE/dm = s(m) - 1, without rounding
           + np.sum(wq * (obj.logit_mix * lam * (label_prob(lam * m, k) - t)
                          - 2.0 * obj.consistency * lam * (d - lam * m) / k)))
    g_d = wq * (obj.input_mix * (label_prob(d, k) - t) + 2.0 * obj.consistency * (d - lam * m) / k)
    return float(ce + np.sum(wq * per)), np.concatenate([[g_m], g_d])


def best_mixed_logits(m: float, obj: Objective, k: int, lam: np.ndarray) -> np.ndarray:
    """d*(lam) for a fixed clean margin m: the root of ``w_im*(s(d)-t) + 2 w_c (d - lam m)/K``
    (increasing in d), between the roots of its two parts; by vectorised bisection."""
    t = target(lam, k)
    fit = math.log(k - 1) + special.logit(t)  # IM alone: s(d) = t
    if obj.consistency == 0.0:
        return fit if obj.input_mix > 0 else lam * m
    if obj.input_mix == 0.0:
        return lam * m
    lo, hi = np.minimum(fit, lam * m), np.maximum(fit, lam * m)
    for _ in range(64):  # the bracket is < 100 wide: 2^-64 of it is below float64 resolution
        mid = (lo + hi) / 2
        f = obj.input_mix * (label_prob(mid, k) - t) + 2.0 * obj.consistency * (mid - lam * m) / k
        lo, hi = np.where(f < 0, mid, lo), np.where(f < 0, hi, mid)
    return (lo + hi) / 2


def margin_force(m: float, obj: Objective, k: int, lam: np.ndarray, wq: np.ndarray) -> float:
    """What moves m when the mixed logits sit at their optimum: dJ/dm (envelope theorem); for a
    stop-gradient variant only the cross-entropy's part reaches m."""
    d = best_mixed_logits(m, obj, k, lam)
    if obj.stop_id:
        return -obj.id * float(special.expit(math.log(k - 1) - m))
    return reduced_loss(m, d, obj, k, lam, wq)[1][0]


def optimum(obj: Objective, k: int, alpha: float, n_nodes: int = 64) -> dict:
    """The optimal clean margin two ways: L-BFGS on J(m, d) (scipy) and the root of the
    first-order condition in m (brentq on :func:`margin_force`). Uncapped: inf, after checking
    that the force on m is < 0 on a grid up to m = 80."""
    lam, wq = beta_nodes(alpha, n_nodes)
    ell = math.log(k - 1)
    if not obj.capped:
        grid = np.linspace(0.0, 80.0, 161)
        forces = [margin_force(m, obj, k, lam, wq) for m in grid]
        if max(forces) >= 0:
            raise AssertionError(f'{obj.name}: a zero of the margin force exists; it is capped')
        return dict(margin=math.inf, logodds=math.inf, margin_foc=math.inf, max_force=max(forces))
    x0 = np.concatenate([[ell + 2.0], best_mixed_logits(ell + 2.0, obj, k, lam)])
    res = optimize.minimize(lambda x: reduced_loss(x[0], x[1:], obj, k, lam, wq), x0, jac=True,
                            method='L-BFGS-B', options=dict(maxiter=5000, gtol=1e-11, ftol=1e-15))
    m_foc = optimize.brentq(lambda m: margin_force(m, obj, k, lam, wq), 0.0, 200.0, xtol=1e-12)
    d = best_mixed_logits(m_foc, obj, k, lam)
    mix_half = best_mixed_logits(m_foc, obj, k, np.array([0.5]))[0]
    return dict(margin=float(res.x[0]), logodds=float(res.x[0]) - ell, margin_foc=float(m_foc),
                logodds_foc=float(m_foc) - ell, grad_norm=float(np.abs(res.jac).max()),
                loss=float(reduced_loss(m_foc, d, obj, k, lam, wq)[0]),
                mixed_logodds_at_half=float(mix_half - ell))


def asymptotic_logodds(alpha: float, k: int) -> float:
    """Leading order of logit mixing alone for large K: s(lam*m) becomes a step at lam = l/m,
    so the first-order condition E[lam*s(lam*m)] = E[lam*t] reads E[lam; lam > r] = E[lam^2]
    with r = l/m, and the log-odds is (1/r - 1)*l."""
    from scipy import stats
    e_lam2 = (alpha + 1) / (2 * (2 * alpha + 1))
    # E[lam; lam > r] = 0.5 * (1 - I_r(alpha+1, alpha)) (the size-biased Beta)
    r = optimize.brentq(lambda r: 0.5 * stats.beta(alpha + 1, alpha).sf(r) - e_lam2, 1e-9, 1 - 1e-9)
    return (1.0 / r - 1.0) * math.log(k - 1)


def rigidity_curve(k: int, alpha: float, rhos) -> list[float]:
    """MixOE (CE + 5 input_mix) when the network cannot bend freely along the mixing path: a
    penalty rho*(d - lam*m)^2/K on mixed logits away from the logit mixture (rho = 0: the free
    network, no cap; rho -> inf: a network linear along the path, i.e. CE + 5 logit_mix). It is
    the objective input_mix 5 + consistency rho, so it is solved as that."""
    w = losses.get_method('mixoe_mixup').weights
    out = []
    for rho in rhos:
        obj = Objective(f'mixoe_rho{rho:g}', input_mix=float(w.input_mix), consistency=rho)
        out.append(optimum(obj, k, alpha)['logodds'] if rho > 0 else math.inf)
    return out


# --------------------------------------------------------------------------------------------------
# Check (i): gradient descent on free logits through the project's loss
# --------------------------------------------------------------------------------------------------

def free_logit_descent(name: str, k: int, alpha: float, steps: int = 3000, n_nodes: int = 24,
                       lr: float = 0.1) -> dict:
    """Adam on unrestricted logits: ID logits Z [K, K] (row y: an image of class y), one outlier
    logit vector, mixed logits [Q, K, K] per quadrature node; the objective is
    ``sum_q w_q * oe_family_loss(lam=lam_q)`` of the preset's weights (the expectation over lam),
    i.e. the project's own code. Returns the margin and MSP log-odds of the final Z."""
    import jax
    import jax.numpy as jnp
    import optax
    weights = losses.get_method(name).weights
    lam, wq = beta_nodes(alpha, n_nodes)
    labels = jnp.arange(k)
    rng = np.random.default_rng(0)
    params = dict(z=jnp.asarray(rng.normal(0, 0.1, (k, k)), jnp.float32),
                  zo=jnp.zeros((k,), jnp.float32),
                  zm=jnp.asarray(rng.normal(0, 0.1, (n_nodes, k, k)), jnp.float32))

    def node_loss(p, lam_q, zm_q):
        zo = jnp.broadcast_to(p['zo'], (k, k))
        return losses.oe_family_loss(logits_id=p['z'], logits_ood=zo, logits_mix=zm_q,
                                     labels=labels, lam=lam_q, weights=weights)[0]

    def loss(p):
        per = jax.vmap(node_loss, in_axes=(None, 0, 0))(p, jnp.asarray(lam, jnp.float32), p['zm'])
        return jnp.sum(jnp.asarray(wq, jnp.float32) * per)

    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=1e-3))
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, value

    history = []
    for i in range(steps):
        params, state, value = step(params, state)
        if (i + 1) in (steps // 2, steps):
            history.append(_margin_of(np.asarray(params['z'], np.float64)))
    half, final = history
    return dict(margin=final['margin'], logodds=final['logodds'], logodds_spread=final['spread'],
                margin_at_half=half['margin'], loss=float(value), steps=steps, nodes=n_nodes)


def _margin_of(z: np.ndarray) -> dict:
    """Margin (label logit minus the mean of the others) and MSP log-odds of each row's label."""
    k = z.shape[0]
    diag = np.diag(z)
    others = (z.sum(1) - diag) / (k - 1)
    logp = z - special.logsumexp(z, axis=1, keepdims=True)
    p = np.exp(np.diag(logp))
    lo = np.log(p) - np.log1p(-p)
    return dict(margin=float(np.mean(diag - others)), logodds=float(np.mean(lo)),
                spread=float(lo.max() - lo.min()))


# --------------------------------------------------------------------------------------------------
# Check (ii): a real small network
# --------------------------------------------------------------------------------------------------

def _fashion_8px(path: str, n: int) -> np.ndarray:
    """n Fashion-MNIST training images as 8x8 in [0, 1]: centre 24x24, 3x3 block means."""
    with gzip.open(os.path.join(path, 'train-images-idx3-ubyte.gz')) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    return raw[:, 2:26, 2:26].reshape(n, 8, 3, 8, 3).mean((2, 4)).reshape(n, 64) / 255.0


def train_digits(name: str, k: int, model: str, outliers: np.ndarray, steps: int = 3000,
                 seed: int = 0, batch: int = 128) -> dict:
    """A linear model or a 1-hidden-layer MLP on scikit-learn digits 0..K-1 (pixels / 16), trained
    with the preset's loss from ``oe_family_loss``, Adam 3e-3, no weight decay, one lam per step,
    mixup in input space. Returns the MSP log-odds of the clean training images (median and
    90th percentile) and the training accuracy."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax
    from sklearn.datasets import load_digits
    from lmoe_jax import mixing
    method = losses.get_method(name)
    digits = load_digits()
    keep = digits.target < k
    x_id = (digits.data[keep] / 16.0).astype(np.float32)
    y_id = digits.target[keep].astype(np.int32)
    x_ood = jnp.asarray(outliers, jnp.float32)
    x_id, y_id = jnp.asarray(x_id), jnp.asarray(y_id)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            if model == 'mlp':
                x = nn.relu(nn.Dense(128)(x))
            return nn.Dense(k)(x)

    net = Net()
    params = net.init(jax.random.key(seed), x_id[:1])
    opt = optax.adam(3e-3)
    state = opt.init(params)

    def loss_fn(p, xb, yb, xo, lam):
        x_mix = mixing.mixup(xb, xo, lam)
        z, zo, zm = jnp.split(net.apply(p, jnp.concatenate([xb, xo, x_mix])), 3)
        return losses.oe_family_loss(logits_id=z, logits_ood=zo, logits_mix=zm, labels=yb,
                                     lam=lam, weights=method.weights)[0]

    @jax.jit
    def step(p, s, key):
        k_id, k_ood, k_lam = jax.random.split(key, 3)
        i = jax.random.randint(k_id, (batch,), 0, x_id.shape[0])
        j = jax.random.randint(k_ood, (batch,), 0, x_ood.shape[0])
        lam = mixing.sample_lam(k_lam, method.alpha)
        g = jax.grad(loss_fn)(p, x_id[i], y_id[i], x_ood[j], lam)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s

    key = jax.random.key(seed + 1)
    for i in range(steps):
        params, state = step(params, state, jax.random.fold_in(key, i))
    z = np.asarray(net.apply(params, x_id), np.float64)
    y_id = np.asarray(y_id)
    logp = z - special.logsumexp(z, axis=1, keepdims=True)
    p_max = np.exp(logp.max(1))
    lo = np.log(p_max) - np.log1p(-np.minimum(p_max, 1 - 1e-15))
    return dict(median_logodds=float(np.median(lo)), p90_logodds=float(np.percentile(lo, 90)),
                train_accuracy=float(np.mean(z.argmax(1) == y_id)), n_id=int(keep.sum()),
                steps=steps)


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

def _json_safe(v):
    """inf -> 'inf', nan -> None (JSON has neither)."""
    if isinstance(v, dict):
        return {key: _json_safe(x) for key, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return 'inf' if v > 0 else ('-inf' if v < 0 else None)
    return v


def _fmt(v: float) -> str:
    return 'inf' if math.isinf(v) else f'{v:.2f}'


def text_report(res: dict) -> str:
    lines = ['Optimal clean-ID MSP log-odds  log(p_max/(1-p_max)) = m* - ln(K-1)  (ideal network)',
             'inf = no cap: only cross-entropy acts on the margin, which then grows without bound', '']
    for alpha in ALPHAS:
        lines.append(f'alpha = {alpha:g}')
        lines.append(f'{"objective":18s}' + ''.join(f'{"K=" + str(k):>8s}' for k in KS))
        for name in OBJECTIVES:
            row = res['model'][name][str(alpha)]
            lines.append(f'{name:18s}' + ''.join(f'{_fmt(row[str(k)]["logodds"]):>8s}' for k in KS))
        lines.append('')
    lines.append('Issue quick model (logit mixing alone, alpha 1) vs this analysis:')
    for k, v in ISSUE_QUICK_MODEL.items():
        ours = res['model']['logit_mix_alone']['1.0'][str(k)]['logodds']
        lines.append(f'  K={k:3d}: issue {v:.2f}  ours {ours:.3f}')
    lines.append('')
    lines.append('Check (i): Adam on free logits through lmoe_jax.losses.oe_family_loss')
    for row in res['free_logits']:
        lines.append(f'  {row["objective"]:15s} K={row["k"]:3d} alpha={row["alpha"]:g}: trained '
                     f'{row["logodds"]:.4f} (margin {row["margin_at_half"]:.4f} -> '
                     f'{row["margin"]:.4f} over the 2nd half), predicted '
                     f'{_fmt(row["predicted_same_nodes"])} ({row["nodes"]} nodes, {row["steps"]} steps)')
    lines.append('')
    lines.append('Check (ii): digits, clean training images, MSP log-odds median / 90th pct')
    for row in res['network']:
        pred = res['model'][row['objective']]['1.0'][str(row['k'])]['logodds']
        lines.append(f'  {row["model"]:6s} K={row["k"]:2d} {row["objective"]:15s}: '
                     f'{row["median_logodds"]:.2f} / {row["p90_logodds"]:.2f}  '
                     f'acc {row["train_accuracy"]:.3f}  predicted {_fmt(pred)}')
    lines.append('')
    lines.append(f'wall {res["wall_s"]:.0f} s, load average before/after {res["load_before"]} / '
                 f'{res["load_after"]}')
    return '\n'.join(lines) + '\n'


def figure(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.8))
    ks = np.array(res['dense_ks'])
    styles = {'logit_mix_alone': ('k', ':'), 'lmoe': ('C3', '-'), 'logit_mixoe': ('C1', '--')}
    ax = axes[0]
    for name, (color, ls) in styles.items():
        ax.plot(ks, res['dense'][name]['1.0'], color=color, ls=ls, label=name)
    for alpha, ls in ((0.5, (0, (1, 1))), (2.0, (0, (5, 2)))):
        ax.plot(ks, res['dense']['lmoe'][str(alpha)], color='C3', ls=ls, lw=1,
                label=f'lmoe, alpha {alpha:g}')
    ax.plot(ks, [asymptotic_logodds(1.0, k) for k in ks], color='grey', lw=0.8,
            label='large-K leading order (alpha 1)')
    ax.scatter(list(ISSUE_QUICK_MODEL), list(ISSUE_QUICK_MODEL.values()), marker='x', color='k',
               label='issue quick model', zorder=5)
    for (label, v), mk in zip(MEASURED_K6.items(), ('v', '^')):
        ax.scatter([6], [v], marker=mk, color='C2', zorder=5, label=f'measured ID 99th pct: {label}')
    for name, color in (('lmoe', 'C3'), ('mixoe_mixup', 'C0')):
        for model, mk in (('linear', 's'), ('mlp', 'o')):
            rows = [r for r in res['network'] if r['objective'] == name and r['model'] == model]
            ax.scatter([r['k'] for r in rows], [r['median_logodds'] for r in rows], marker=mk,
                       facecolor='none', edgecolor=color, zorder=5,
                       label=f'digits {model}, {name} (median)')
    ax.set(xscale='log', xlabel='ID classes K', ylabel='clean-ID MSP log-odds at the optimum',
           title='capped objectives (alpha 1 unless named)')
    ax.text(0.02, 0.97, 'no cap (inf): baseline, mixoe_mixup (free network),\nlmoe_sg, logit_mixoe_sg',
            transform=ax.transAxes, va='top', fontsize=8)
    ax.legend(fontsize=6.5, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax = axes[1]
    rhos = res['rigidity']['rho']
    for k in res['rigidity']['ks']:
        ax.plot(rhos, res['rigidity'][str(k)], marker='.', label=f'mixoe_mixup + rigidity, K={k}')
        ax.axhline(res['model']['lmoe']['1.0'][str(k)]['logodds'], color='C3', lw=0.8, ls='--')
    ax.set(xscale='log', xlabel='rigidity rho of the mixing path (MSE/K units)',
           ylabel='optimal clean-ID MSP log-odds',
           title='MixOE: capped only by how stiff f is along the path\n(dashed: lmoe, the rho -> inf limit)')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14))
    ax = axes[2]
    lam = np.linspace(0.01, 0.99, 99)
    for name, color in (('mixoe_mixup', 'C0'), ('lmoe', 'C3'), ('logit_mixoe', 'C1'),
                        ('lmoe_sg', 'C4'), ('logit_mixoe_sg', 'C5')):
        ax.plot(lam, np.array(res['mixed_curves'][name], float), color=color, label=name)
    ax.set(xlabel='lam (share of the ID image)', ylabel='MSP log-odds of the mixed image',
           title=f'mixed images, K=6, alpha 1 (uncapped variants at\nclean log-odds '
                 f'{UNCAPPED_REFERENCE_LOGODDS:g})')
    ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.14), ncol=3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mixed_curve(name: str, k: int, lam: np.ndarray, alpha: float = 1.0) -> list[float]:
    """MSP log-odds of the mixed image along lam at the clean optimum (uncapped: at the
    reference clean log-odds)."""
    obj = objective(name)
    opt = optimum(obj, k, alpha)
    m = (opt['margin_foc'] if obj.capped else UNCAPPED_REFERENCE_LOGODDS + math.log(k - 1))
    if obj.input_mix == 0 and obj.consistency == 0:
        return [math.nan] * lam.size
    return list(best_mixed_logits(m, obj, k, lam) - math.log(k - 1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'margin_cap'))
    parser.add_argument('--figure', default=os.path.join(ROOT, 'docs', 'images', 'margin_cap.png'))
    parser.add_argument('--fashion_mnist_dir', default='/usr/share/datasets/fashion-mnist')
    parser.add_argument('--replot', action='store_true',
                        help='redraw the figure from the JSON of an earlier run, compute nothing')
    args = parser.parse_args(argv)
    if args.replot:
        with open(args.out + '.json') as f:
            figure(json.load(f), args.figure)
        print(f'redrew {args.figure} from {args.out}.json')
        return
    start, load_before = time.time(), open('/proc/loadavg').read().split()[:3]
    res = dict(ks=list(KS), alphas=list(ALPHAS), model={})
    for name in OBJECTIVES:
        obj = objective(name)
        res['model'][name] = {str(a): {str(k): optimum(obj, k, a) for k in KS} for a in ALPHAS}
    res['weights'] = {n: dataclasses.asdict(objective(n)) for n in OBJECTIVES}
    res['dense_ks'] = [int(k) for k in np.unique(np.geomspace(3, 1000, 40).round())]
    res['dense'] = {n: {str(a): [optimum(objective(n), k, a)['logodds'] for k in res['dense_ks']]
                        for a in ALPHAS} for n in ('logit_mix_alone', 'lmoe', 'logit_mixoe')}
    rhos = [0.01, 0.1, 1, 10, 100, 1e3, 1e4, 1e5]
    res['rigidity'] = dict(rho=rhos, ks=[6, 200])
    for k in (6, 200):
        res['rigidity'][str(k)] = rigidity_curve(k, 1.0, rhos)
    lam = np.linspace(0.01, 0.99, 99)
    res['mixed_curves'] = {n: mixed_curve(n, 6, lam) for n in
                           ('mixoe_mixup', 'lmoe', 'logit_mixoe', 'lmoe_sg', 'logit_mixoe_sg')}

    res['free_logits'] = []
    for name, k, alpha in FREE_LOGIT_CASES:
        nodes, steps = (24, 3000) if k <= 50 else (12, 1500)  # K = 200: 12 x 200 x 200 mixed logits
        row = free_logit_descent(name, k, alpha, steps=steps, n_nodes=nodes)
        pred = optimum(objective(name), k, alpha, n_nodes=nodes)['logodds']
        res['free_logits'].append(dict(objective=name, k=k, alpha=alpha, predicted_same_nodes=pred,
                                       **row))
    outliers = _fashion_8px(args.fashion_mnist_dir, 2000)
    res['network'] = []
    for model in ('linear', 'mlp'):
        for k in NETWORK_KS:
            for name in NETWORK_METHODS:
                row = train_digits(name, k, model, outliers, steps=2000)
                res['network'].append(dict(objective=name, k=k, model=model, **row))
    res['wall_s'] = time.time() - start
    res['load_before'], res['load_after'] = load_before, open('/proc/loadavg').read().split()[:3]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + '.json', 'w') as f:
        json.dump(_json_safe(res), f, indent=1)
    report = text_report(res)
    with open(args.out + '.txt', 'w') as f:
        f.write(report)
    figure(res, args.figure)
    print(report, end='')
    print(f'wrote {args.out}.json, {args.out}.txt and {args.figure}')


if __name__ == '__main__':
    main()
