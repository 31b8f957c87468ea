"""Candidate model-side changes for XLA, applied by monkeypatching so the benchmark can prove them.

``train_step.py --variants='name=patch:dot1x1'`` calls ``apply('dot1x1')`` in the worker before
the model is built. Nothing here changes ``lmoe_jax`` on disk; a variant that measurably helps is
described in docs/benchmarks.md as the exact change to make in ``lmoe_jax/models/resnet.py``
(``smallmap_dot1x1`` shipped that way as ``model.matmul_convs``). ``plain`` forces lax
convolutions whatever ``model.matmul_convs`` resolves to.
"""
from __future__ import annotations

import functools

from jax import lax

from lmoe_jax.models.cpu_convs import conv_as_patches_dot, conv_or_dot, make_small_map_conv


def _patch_conv(conv_fn) -> None:
    """Give every nn.Conv of lmoe_jax's ResNets ``conv_general_dilated=conv_fn`` (same params)."""
    from lmoe_jax.models import resnet
    original = resnet._layers

    def layers(dtype, train, bn_axis_name, matmul_convs=False):
        conv, norm = original(dtype, train, bn_axis_name, matmul_convs)
        return functools.partial(conv, conv_general_dilated=conv_fn), norm

    resnet._layers = layers


PATCHES = {
    'plain': lambda: _patch_conv(lax.conv_general_dilated),  # what model.matmul_convs=False builds
    'dot1x1': lambda: _patch_conv(conv_or_dot),
    'smallmap': lambda: _patch_conv(make_small_map_conv(None)),
    'smallmap_dot1x1': lambda: _patch_conv(make_small_map_conv(None, pointwise_as_dot=True)),
    'small16': lambda: _patch_conv(make_small_map_conv(16)),
    'im2col_all': lambda: _patch_conv(make_small_map_conv(2**62, pointwise_as_dot=True)),
}


def apply(names: str) -> None:
    """Apply the comma-separated patches ``names`` (before any model is built)."""
    for name in filter(None, names.split(',')):
        if name not in PATCHES:
            raise ValueError(f'unknown patch {name!r}; valid: {", ".join(PATCHES)}')
        PATCHES[name]()


__all__ = ['apply', 'conv_or_dot', 'conv_as_patches_dot', 'make_small_map_conv', 'PATCHES']
