"""Input-space mixing of ID and outlier images (mixup, cutmix) and lam sampling.

Everything is static-shape and jittable: a cutmix box is a boolean mask, not a dynamic slice.
Images are NHWC. ``lam`` is a scalar (one per step, as MixOE does) or one value per example.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def sample_lam(key: Array, alpha: float, shape: tuple[int, ...] = ()) -> Array:
    """``lam ~ Beta(alpha, alpha)`` (float32), a scalar by default or ``shape`` values."""
    if not isinstance(alpha, jax.core.Tracer) and float(alpha) <= 0:
        raise ValueError(f'alpha of Beta(alpha, alpha) must be > 0; got {alpha}')
    return jax.random.beta(key, alpha, alpha, shape, dtype=jnp.float32)


def _lam_for_images(lam: Array, x: Array) -> Array:
    """lam broadcastable against NHWC images: () -> (), (B,) -> (B, 1, 1, 1)."""
    lam = jnp.asarray(lam, jnp.float32)
    return lam.reshape(lam.shape + (1,) * (x.ndim - lam.ndim)) if lam.ndim else lam


def mixup(x_id: Array, x_ood: Array, lam: Array | float) -> Array:
    """``lam*x_id + (1-lam)*x_ood`` in the images' dtype."""
    if x_id.shape != x_ood.shape:
        raise ValueError(f'ID and outlier batches must have the same shape; got {x_id.shape} '
                         f'and {x_ood.shape}')
    lam = _lam_for_images(lam, x_id)
    mixed = lam * x_id.astype(jnp.float32) + (1.0 - lam) * x_ood.astype(jnp.float32)
    return mixed.astype(x_id.dtype)


def cutmix_box(key: Array, lam: Array, height: int, width: int) -> tuple[Array, Array]:
    """A box of about ``(1-lam)`` of the image, centred uniformly at random and clipped at the border.

    Follows MixOE/CutMix: side ``floor(size*sqrt(1-lam))``, centre uniform over the pixels, then
    clipped. Returns ``(mask, lam_exact)``: mask ``lam.shape + (H, W)``, True inside the box, and
    ``lam_exact = 1 - box_area/(H*W)``, the ratio the clipped box really leaves to the ID image.
    """
    lam = jnp.asarray(lam, jnp.float32)
    key_y, key_x = jax.random.split(key)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(key_y, lam.shape, 0, height)
    cx = jax.random.randint(key_x, lam.shape, 0, width)
    y1, y2 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x1, x2 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows = jnp.arange(height)
    cols = jnp.arange(width)
    in_rows = (rows >= y1[..., None]) & (rows < y2[..., None])  # lam.shape + (H,)
    in_cols = (cols >= x1[..., None]) & (cols < x2[..., None])  # lam.shape + (W,)
    mask = in_rows[..., :, None] & in_cols[..., None, :]
    area = ((y2 - y1) * (x2 - x1)).astype(jnp.float32)
    return mask, 1.0 - area / (height * width)


def cutmix(key: Array, x_id: Array, x_ood: Array, lam: Array | float) -> tuple[Array, Array]:
    """Paste an outlier box of area ~(1-lam) into each ID image (MixOE's cutmix).

    Returns ``(x_mix, lam_exact)`` where ``lam_exact`` is the exact share of ID pixels; use it in
    the soft target. Pixels outside the box are the ID image's, untouched.
    """
    if x_id.shape != x_ood.shape:
        raise ValueError(f'ID and outlier batches must have the same shape; got {x_id.shape} '
                         f'and {x_ood.shape}')
    _, height, width, _ = x_id.shape
    mask, lam_exact = cutmix_box(key, jnp.asarray(lam, jnp.float32), height, width)
    mask = mask[..., None]  # (H, W, 1) or (B, H, W, 1)
    return jnp.where(mask, x_ood, x_id), lam_exact


def mix_batch(key: Array, x_id: Array, x_ood: Array, *, kind: str, alpha: float,
              per_example: bool = False) -> tuple[Array, Array]:
    """Sample lam and build the mixed batch: ``(x_mix, lam)`` with lam exact for cutmix."""
    key_lam, key_box = jax.random.split(key)
    lam = sample_lam(key_lam, alpha, (x_id.shape[0],) if per_example else ())
    if kind == 'mixup':
        return mixup(x_id, x_ood, lam), lam
    if kind == 'cutmix':
        return cutmix(key_box, x_id, x_ood, lam)
    raise ValueError(f"mix kind must be 'mixup' or 'cutmix'; got {kind!r}")
