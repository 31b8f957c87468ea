"""OOD scores: pure, jittable, batched; every score is *higher = more in-distribution*.

Logit scores take logits ``[B, K]``; feature scores also take penultimate features
``[B, D]`` and statistics fitted on ID data (see ``lmoe_jax.ood.fitting``). ODIN needs the
model itself because it perturbs the input along the gradient of its own confidence.
All scores are computed in float32 whatever the dtype of the inputs. MSP and ODIN report the
log-odds of the max softmax probability (same ranking, no saturation at 1.0).
"""
from typing import Any, Callable, Sequence, Tuple

import jax
import jax.numpy as jnp

FEATURE_SCORES = ('mahalanobis', 'vim', 'react')
FITTED_SCORES = ('kl_matching',) + FEATURE_SCORES
ALL_SCORES = ('msp', 'max_logit', 'energy', 'odin', 'gen', 'kl_matching', 'mahalanobis', 'vim', 'react')


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _max_and_rest(logits):
    """(largest logit [B], log-sum-exp of the other logits [B]); a tie for the largest is kept
    in the rest, so two equal top logits give a rest equal to the max."""
    z = _f32(logits)
    top = jnp.argmax(z, axis=-1)
    rest = jnp.where(jax.nn.one_hot(top, z.shape[-1], dtype=bool), -jnp.inf, z)
    return jnp.max(z, axis=-1), jax.nn.logsumexp(rest, axis=-1)


def msp(logits):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017), reported as its log-odds.

    Returns ``log(p / (1 - p))`` of ``p = max softmax``, computed as ``z_max - logsumexp(z_rest)``
    so it never saturates: a float32 softmax rounds ``p`` to exactly 1.0 once the others sum below
    ~6e-8, which ties confident images that the logits tell apart. Strictly increasing in ``p``
    (``p = sigmoid(score)``), so rank-based metrics are those of MSP without the rounding of ``p``.
    """
    if _f32(logits).shape[-1] < 2:
        return jnp.zeros(_f32(logits).shape[:-1], jnp.float32)  # one class: p = 1 for every image
    top, rest = _max_and_rest(logits)
    return top - rest


def max_logit(logits):
    """Largest logit (Hendrycks et al., 2022); not squashed by the softmax."""
    return jnp.max(_f32(logits), axis=-1)


def energy(logits, temperature: float = 1.0):
    """Negative free energy ``T * logsumexp(z / T)`` (Liu et al., 2020)."""
    return temperature * jax.nn.logsumexp(_f32(logits) / temperature, axis=-1)


def gen(logits, gamma: float = 0.1, top_m: int = 100):
    """Negative generalized entropy over the ``top_m`` largest probabilities (Liu et al., CVPR 2023).

    ``-sum_j p_j^gamma (1 - p_j)^gamma``; a confident prediction has a small entropy. ``1 - p``
    of the top class comes from the other logits (``log(1 - p_max) = lse(z_rest) - lse(z)``),
    not from ``1 - p``, which is 0 once float32 rounds ``p`` to 1.
    """
    z = _f32(logits)
    log_p = jax.nn.log_softmax(z, axis=-1)
    m = min(int(top_m), z.shape[-1])
    top_log_p = jax.lax.top_k(log_p, m)[0]
    log_1m = jnp.log1p(-jnp.exp(top_log_p))  # accurate for p <= 1/2: every class but the top one
    if z.shape[-1] > 1:
        _, rest = _max_and_rest(z)
        log_1m = log_1m.at[..., 0].set(rest - jax.nn.logsumexp(z, axis=-1))
    return -jnp.sum(jnp.exp(gamma * (top_log_p + log_1m)), axis=-1)


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
         epsilon: float = 0.0014, *, input_std: Sequence[float]):
    """ODIN (Liang et al., 2018) as OpenOOD computes it: MSP of ``z / T`` after a small input step.

    ``logits_fn(images) -> logits``; ``images`` [B, ..., C] as the model sees them. The step is
    ``epsilon * s / input_std`` per channel, ``s = +1`` where the gradient of the tempered
    cross-entropy of the predicted class is >= 0 and ``-1`` elsewhere, subtracted from the input:
    dividing by the per-channel std of the input normalisation (see :func:`normalization_std`) makes
    ``epsilon`` a step in pixel units. Returns the log-odds like :func:`msp`. Examples are
    independent in eval mode, so the gradient of the batch sum is the per-example gradient.
    """
    images = _f32(images)
    std = _f32(input_std)
    if std.ndim != 1 or std.shape[0] != images.shape[-1]:
        raise ValueError(f'input_std needs one value per channel ({images.shape[-1]}); got {input_std}.')

    def loss(x):
        scaled = _f32(logits_fn(x)) / temperature
        pred = jax.lax.stop_gradient(jnp.argmax(scaled, axis=-1))
        log_p = jax.nn.log_softmax(scaled, axis=-1)
        return -jnp.sum(jnp.take_along_axis(log_p, pred[:, None], axis=-1))

    sign = jnp.where(jax.grad(loss)(images) >= 0, 1.0, -1.0)
    return msp(_f32(logits_fn(images - epsilon * sign / std)) / temperature)


def normalization_std(normalize: str, channels: int) -> Tuple[float, ...]:
    """Per-channel std that the input pipeline divided images by (``config.data.normalize``).

    'imagenet': ImageNet's std (grey images: their mean, as ``lmoe_jax.data.preprocess`` does);
    'none': 1.0 (pixels in [0, 1]). This is ODIN's ``input_std``.
    """
    from lmoe_jax.data import preprocess  # imports TensorFlow: only when asked
    if normalize not in preprocess.NORMALIZATIONS or channels not in (1, 3):
        raise ValueError(f'normalize must be one of {preprocess.NORMALIZATIONS} and channels 1 or 3; '
                         f'got {normalize!r}, {channels}.')
    if normalize == 'none':
        return (1.0,) * channels
    std = tuple(float(s) for s in preprocess.IMAGENET_STD)
    return std if channels == 3 else (sum(std) / 3.0,)


def normalization_std_from_config(data_config) -> Tuple[float, ...]:
    """:func:`normalization_std` of a run's ``config.data`` (its ``normalize`` and ``grayscale``)."""
    from lmoe_jax.data import preprocess  # imports TensorFlow: only when asked
    transform = preprocess.transform_from_config(data_config)
    return normalization_std(transform.normalize, transform.channels)
