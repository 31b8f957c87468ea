"""Input-space mixing of ID and outlier images (mixup, cutmix) and lam sampling.

Everything is static-shape and jittable: a cutmix box is a boolean mask, not a dynamic slice.
Images are NHWC. ``lam`` is a scalar (one per step, as MixOE does) or one value per example.
``mix_batch`` is what the train step calls.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def mix_batch(key: Array, x_id: Array, x_ood: Array, *, kind: str | None, alpha: float,
              per_example: bool = False, axis_name: str | None = None,
              mesh: Mesh | None = None) -> tuple[Array | None, Array]:
    """Sample lam and build the mixed batch: ``(x_mix, lam)``; the train step's own draw.

    ``kind``: 'mixup', 'cutmix' (an outlier box pasted into the ID images; lam becomes the exact
    share of ID pixels, for the soft target) or None (lam only, ``x_mix`` None: logit mixing alone).
    ``per_example``: one lam (and one box) per image instead of one for the batch, as MixOE does.

    The result does not depend on the device layout: inside ``pmap`` (``axis_name``) the
    per-example values are drawn for the global batch and each device takes its slice, so pmap,
    jit over a mesh and one device see the same lam for the same example. On a ``mesh`` the draw
    is pinned replicated: every device draws the batch's few lam values itself; left to XLA, the
    Beta sampler would be split over the devices and its rejection loop would all-reduce its
    stop flag every iteration.
    """
    if kind not in ('mixup', 'cutmix', None):
        raise ValueError(f"mix kind must be 'mixup' or 'cutmix'; got {kind!r}")
    if x_id.shape != x_ood.shape:
        raise ValueError(f'ID and outlier batches must have the same shape; got {x_id.shape} '
                         f'and {x_ood.shape}')
    local = x_id.shape[0]
    n_dev = jax.lax.axis_size(axis_name) if axis_name else 1
    key_lam, key_box = jax.random.split(key)
    lam = sample_lam(key_lam, alpha, (local * n_dev,) if per_example else ())
    if mesh is not None:
        lam = jax.lax.with_sharding_constraint(lam, NamedSharding(mesh, PartitionSpec()))
    mask = None
    if kind == 'cutmix':
        mask, lam = cutmix_box(key_box, lam, x_id.shape[1], x_id.shape[2])
    if per_example and axis_name:
        start = jax.lax.axis_index(axis_name) * local
        lam = jax.lax.dynamic_slice_in_dim(lam, start, local)
        if mask is not None:
            mask = jax.lax.dynamic_slice_in_dim(mask, start, local)
    if kind is None:
        return None, lam
    if mask is not None:
        return jnp.where(mask[..., None], x_ood, x_id), lam
    return mixup(x_id, x_ood, lam), lam
