"""Candidate model-side changes for XLA, applied by monkeypatching so the benchmark can prove them.

``train_step.py --variants='name=patch:dot1x1'`` calls ``apply('dot1x1')`` in the worker before
the model is built. Nothing here changes ``lmoe_jax`` on disk; a variant that measurably helps is
described in docs/benchmarks.md as the exact change to make in ``lmoe_jax/models/resnet.py``
(``smallmap_dot1x1`` shipped that way as ``model.matmul_convs``). ``plain`` forces lax
convolutions whatever ``model.matmul_convs`` resolves to.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lmoe_jax.models.cpu_convs import (_is_pointwise, conv_as_patches_dot, conv_or_dot,
                                       make_small_map_conv)


def _patch_conv(conv_fn) -> None:
    """Give every nn.Conv of lmoe_jax's ResNets ``conv_general_dilated=conv_fn`` (same params)."""
    from lmoe_jax.models import resnet
    original = resnet._layers

    def layers(dtype, train, bn_axis_name, matmul_convs=False):
        conv, norm = original(dtype, train, bn_axis_name, matmul_convs)
        return functools.partial(conv, conv_general_dilated=conv_fn), norm

    resnet._layers = layers


def conv_wgrad_patches_dot(lhs, rhs, window_strides, padding, lhs_dilation=None,
                           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                           precision=None, **kwargs):
    """Candidate: lax convolution forward and input gradient, weight gradient as one GEMM.

    At 224 px XLA:CPU computes the weight gradient of a kxk convolution as a convolution whose
    window is the whole map, after copying activations and output gradient into transposed
    layouts; here it is ``im2col(x)^T @ g`` over the shifted views instead (custom VJP), which
    trades those copies for a kxk-times larger patch matrix. 1x1 convolutions: ``conv_or_dot``.
    """
    if rhs.shape[0] * rhs.shape[1] == 1 or isinstance(padding, str) or kwargs \
            or feature_group_count != 1 or any(d not in (None, (1, 1)) for d in
                                               (lhs_dilation, rhs_dilation)):
        return conv_or_dot(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, precision, **kwargs)
    conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides,
                             padding=padding, dimension_numbers=dimension_numbers,
                             precision=precision)

    @jax.custom_vjp
    def f(x, w):
        return conv(x, w)

    def f_fwd(x, w):
        return conv(x, w), (x, w)

    def f_bwd(res, g):
        x, w = res
        kh, kw, cin, cout = w.shape
        (sh, sw), (ph, pw) = window_strides, padding
        xp = jnp.pad(x, ((0, 0), tuple(ph), tuple(pw), (0, 0)))
        ho, wo = g.shape[1], g.shape[2]
        cols = jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
                                for i in range(kh) for j in range(kw)], axis=-1)
        gw = jnp.einsum('nhwk,nhwo->ko', cols, g, precision=precision).reshape(w.shape)
        gx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
        return gx, gw

    f.defvjp(f_fwd, f_bwd)
    return f(lhs, rhs)


def conv_or_dot_4d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                   dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """The 1x1 dot as it shipped first: a 4-D einsum (A/B baseline for the 2-D ``conv_or_dot``)."""
    if not _is_pointwise(rhs.shape, padding, lhs_dilation, rhs_dilation, feature_group_count):
        return conv_or_dot(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                           dimension_numbers, feature_group_count, precision, **kwargs)
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return jnp.einsum('nhwc,co->nhwo', x, rhs[0, 0], precision=precision)


def _smallmap_then(fallback):
    """smallmap_dot1x1, with ``fallback`` for the convolutions it leaves to lax."""
    small = make_small_map_conv(None)

    def conv(lhs, rhs, *args, **kwargs):
        if _is_small(lhs, rhs, *args):
            return small(lhs, rhs, *args, **kwargs)
        return fallback(lhs, rhs, *args, **kwargs)
    return conv


def _is_small(lhs, rhs, window_strides, padding, *args) -> bool:
    """make_small_map_conv(None)'s condition (input or output map smaller than the window)."""
    if isinstance(padding, str):
        return False
    (ph, pw), (sh, sw) = padding, window_strides
    ho = (lhs.shape[1] + sum(ph) - rhs.shape[0]) // sh + 1
    wo = (lhs.shape[2] + sum(pw) - rhs.shape[1]) // sw + 1
    area = rhs.shape[0] * rhs.shape[1]
    return area > 1 and min(lhs.shape[1] * lhs.shape[2], ho * wo) < area


PATCHES = {
    'plain': lambda: _patch_conv(lax.conv_general_dilated),  # what model.matmul_convs=False builds
    'dot1x1': lambda: _patch_conv(conv_or_dot),
    'smallmap': lambda: _patch_conv(make_small_map_conv(None)),
    'smallmap_dot1x1': lambda: _patch_conv(make_small_map_conv(None, pointwise_as_dot=True)),
    'small16': lambda: _patch_conv(make_small_map_conv(16)),
    'wgrad_patches': lambda: _patch_conv(_smallmap_then(conv_wgrad_patches_dot)),
    'smallmap_dot1x1_4d': lambda: _patch_conv(_smallmap_then(conv_or_dot_4d)),
    'im2col_all': lambda: _patch_conv(make_small_map_conv(2**62, pointwise_as_dot=True)),
}


def apply(names: str) -> None:
    """Apply the comma-separated patches ``names`` (before any model is built)."""
    for name in filter(None, names.split(',')):
        if name not in PATCHES:
            raise ValueError(f'unknown patch {name!r}; valid: {", ".join(PATCHES)}')
        PATCHES[name]()


__all__ = ['apply', 'conv_or_dot', 'conv_as_patches_dot', 'make_small_map_conv', 'PATCHES']
