"""OOD scores: pure, jittable, batched; every score is *higher = more in-distribution*.

Logit scores take logits ``[B, K]``; feature scores also take penultimate features
``[B, D]`` and statistics fitted on ID data (see ``lmoe_jax.ood.fitting``). ODIN needs the
model itself because it perturbs the input along the gradient of its own confidence.
All scores are computed in float32 whatever the dtype of the inputs.
"""
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

LOGIT_SCORES = ('msp', 'max_logit', 'energy', 'gen')
FEATURE_SCORES = ('mahalanobis', 'vim', 'react')
FITTED_SCORES = ('kl_matching',) + FEATURE_SCORES
INPUT_SCORES = ('odin',)
ALL_SCORES = ('msp', 'max_logit', 'energy', 'odin', 'gen', 'kl_matching', 'mahalanobis', 'vim', 'react')


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def msp(logits):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017)."""
    return jnp.max(jax.nn.softmax(_f32(logits), axis=-1), axis=-1)


def max_logit(logits):
    """Largest logit (Hendrycks et al., 2022); not squashed by the softmax."""
    return jnp.max(_f32(logits), axis=-1)


def energy(logits, temperature: float = 1.0):
    """Negative free energy ``T * logsumexp(z / T)`` (Liu et al., 2020)."""
    return temperature * jax.nn.logsumexp(_f32(logits) / temperature, axis=-1)


def gen(logits, gamma: float = 0.1, top_m: int = 100):
    """Negative generalized entropy over the ``top_m`` largest probabilities (Liu et al., CVPR 2023).

    ``-sum_j p_j^gamma (1 - p_j)^gamma``; a confident prediction has a small entropy.
    """
    probs = jax.nn.softmax(_f32(logits), axis=-1)
    m = min(int(top_m), probs.shape[-1])
    top = jax.lax.top_k(probs, m)[0]
    return -jnp.sum(top ** gamma * (1.0 - top) ** gamma, axis=-1)


def kl_matching(logits, class_mean_probs):
    """Minus the smallest KL(p(x) || d_k) over classes k (Hendrycks et al., 2022; OpenOOD form).

    ``class_mean_probs`` [C, K]: row k is the mean softmax of the ID validation images
    *predicted* as one class; classes never predicted are simply absent (C <= K).
    """
    probs = jax.nn.softmax(_f32(logits), axis=-1)
    log_probs = jax.nn.log_softmax(_f32(logits), axis=-1)
    log_means = jnp.log(jnp.clip(_f32(class_mean_probs), 1e-30))
    neg_entropy = jnp.sum(probs * log_probs, axis=-1, keepdims=True)  # [B, 1]
    kl = neg_entropy - probs @ log_means.T  # [B, C]
    return -jnp.min(kl, axis=-1)


def mahalanobis(features, class_means, precision):
    """Minus the smallest Mahalanobis distance to a class mean, tied covariance (Lee et al., 2018).

    Expanded as ``f P f - 2 f P mu_k + mu_k P mu_k`` so a batch costs two matrix products.
    ``class_means`` [C, D] holds only the classes seen while fitting.
    """
    feats = _f32(features)
    means = _f32(class_means)
    prec = _f32(precision)
    f_p = feats @ prec  # [B, D]
    m_p = means @ prec  # [K, D]
    dist = (jnp.sum(f_p * feats, axis=-1, keepdims=True)
            - 2.0 * feats @ m_p.T
            + jnp.sum(m_p * means, axis=-1)[None, :])
    return -jnp.min(jnp.maximum(dist, 0.0), axis=-1)


def vim(logits, features, origin, null_space, alpha):
    """Virtual-logit matching (Wang et al., CVPR 2022): energy minus the scaled residual norm.

    ``origin`` = ``-pinv(W^T) b``; ``null_space`` [D, D - d] spans the complement of the top-d
    principal directions of the ID features; ``alpha`` matches the residual to the logit scale.
    """
    residual = jnp.linalg.norm((_f32(features) - _f32(origin)) @ _f32(null_space), axis=-1)
    return jax.nn.logsumexp(_f32(logits), axis=-1) - alpha * residual


def react(features, kernel, bias, threshold, temperature: float = 1.0):
    """ReAct (Sun et al., 2021): clip features at an ID percentile, recompute logits, take energy."""
    clipped = jnp.minimum(_f32(features), threshold)
    logits = clipped @ _f32(kernel) + _f32(bias)
    return energy(logits, temperature)


def odin(logits_fn: Callable[[Any], jax.Array], images, temperature: float = 1000.0,
         epsilon: float = 0.0014, input_std: Optional[Sequence[float]] = None):
    """ODIN (Liang et al., 2018): temperature-scaled MSP after a small step that raises it.

    ``logits_fn(images) -> logits``. The input moves by ``epsilon * sign(grad)`` (divided by the
    per-channel ``input_std`` when images are normalised, as OpenOOD does) in the direction that
    lowers the temperature-scaled cross-entropy of the predicted class. Examples are independent
    in eval mode, so the gradient of the batch sum is the per-example gradient.
    """
    images = _f32(images)

    def loss(x):
        scaled = _f32(logits_fn(x)) / temperature
        pred = jax.lax.stop_gradient(jnp.argmax(scaled, axis=-1))
        log_p = jax.nn.log_softmax(scaled, axis=-1)
        return -jnp.sum(jnp.take_along_axis(log_p, pred[:, None], axis=-1))

    step = jnp.sign(jax.grad(loss)(images))
    if input_std is not None:
        step = step / jnp.asarray(input_std, jnp.float32)
    perturbed = images - epsilon * step
    return msp(_f32(logits_fn(perturbed)) / temperature)
