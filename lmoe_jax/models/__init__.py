"""Model factory: torchvision-layout ResNets and the small 28 px demo network.

    model = create_model(config.model, num_classes)
    variables = model.init(rng, x, train=False)              # {'params', 'batch_stats'}
    logits = model.apply(variables, x, train=False)          # float32 [B, K]
    logits, feats = model.apply(variables, x, train=False, return_features=True)
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmoe_jax.models.pretrained import (PretrainedMismatchError, PretrainedUnavailableError,
                                        load_pretrained, maybe_load_pretrained)
from lmoe_jax.models.resnet import ARCHITECTURES, BasicBlock, Bottleneck, ResNet

MODEL_NAMES = tuple(ARCHITECTURES)
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
DEFAULT_WIDTH = {'resnet18': 64, 'resnet34': 64, 'resnet50': 64, 'small_cnn': 16}


def create_model(model_config: Any, num_classes: int, *, bn_axis_name: str | None = None) -> ResNet:
    """Build the Flax module named by `model_config.name` (a ConfigDict or dict).

    Reads `name`, `width` (base channels; 64 = torchvision), `dtype` (compute dtype; params
    and outputs stay float32), optional `zero_init_residual` (last BN gamma of each block
    starts at 0) and optional `matmul_convs` (True / False / 'auto', the default: the
    matrix-product convolutions of `cpu_convs` on the CPU backend only, see
    :func:`resolve_matmul_convs`).
    `bn_axis_name` makes BatchNorm average its batch statistics over that
    mapped axis (pass the pmap axis name so pmap matches jit over a global batch).
    `model_config.pretrained` is not read here: see `lmoe_jax.models.pretrained`.
    """
    name = _get(model_config, 'name', None)
    if name not in ARCHITECTURES:
        raise ValueError(
            f"Unknown model name {name!r}; set config.model.name to one of "
            f"{', '.join(MODEL_NAMES)}.")
    dtype_name = str(_get(model_config, 'dtype', 'float32'))
    if dtype_name not in COMPUTE_DTYPES:
        raise ValueError(
            f"Unknown compute dtype {dtype_name!r}; set config.model.dtype to one of "
            f"{', '.join(COMPUTE_DTYPES)}.")
    width = _get(model_config, 'width', None)
    width = DEFAULT_WIDTH[name] if width is None else width
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"config.model.width must be a positive integer, got {width!r}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    matmul_convs = resolve_matmul_convs(_get(model_config, 'matmul_convs', 'auto'))
    block_cls, stage_sizes, stem = ARCHITECTURES[name]
    return ResNet(
        block_cls=block_cls, stage_sizes=stage_sizes, num_classes=num_classes, width=width,
        stem=stem, dtype=COMPUTE_DTYPES[dtype_name],
        zero_init_residual=bool(_get(model_config, 'zero_init_residual', False)),
        bn_axis_name=bn_axis_name,
        matmul_convs=matmul_convs)


def resolve_matmul_convs(value: Any) -> bool:
    """`config.model.matmul_convs` -> whether the ResNet uses `cpu_convs.matmul_conv`.

    'auto' means the CPU backend (`jax.default_backend() == 'cpu'`): the rewrite is 2.5-3x faster
    there and has not been measured on GPU/TPU, whose convolution kernels need no such help.
    """
    if isinstance(value, str) and value == 'auto':
        return jax.default_backend() == 'cpu'
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"config.model.matmul_convs must be True, False or 'auto', got {value!r}.")


def _get(config: Any, key: str, default: Any) -> Any:
    """ConfigDict, dict and plain-attribute objects alike."""
    if hasattr(config, 'get'):
        return config.get(key, default)
    return getattr(config, key, default)


__all__ = ['create_model', 'resolve_matmul_convs', 'MODEL_NAMES', 'ResNet', 'BasicBlock',
           'Bottleneck', 'load_pretrained',
           'maybe_load_pretrained', 'PretrainedMismatchError', 'PretrainedUnavailableError']
