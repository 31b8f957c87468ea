"""Flax ResNets in torchvision's layout, so ImageNet weights map one-to-one.

Module names follow torchvision's state_dict keys with '.' between a stage and its block
index replaced by '_': torchvision ``layer2.0.downsample.1.running_mean`` is
``batch_stats['layer2_0']['downsample_1']['mean']`` here (see ``pretrained.py``).
Padding is explicit (never 'SAME') because 'SAME' pads stride-2 convolutions on one side
only, while torchvision pads both sides; the two disagree on every strided layer.
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmoe_jax.models import cpu_convs

# torchvision's init: kaiming normal, fan_out, relu gain.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torchvision's nn.Linear kernel init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
FC_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
BN_MOMENTUM = 0.9  # flax keeps `momentum` of the old value: torchvision's momentum 0.1
BN_EPSILON = 1e-5


def _layers(dtype: Any, train: bool, bn_axis_name: str | None, matmul_convs: bool = False):
    """Conv and BatchNorm constructors shared by every block (float32 params, `dtype` compute)."""
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=dtype, param_dtype=jnp.float32, kernel_init=CONV_INIT)
    if matmul_convs:  # CPU speed-up, same parameters: see cpu_convs.py (create_model resolves 'auto')
        conv = functools.partial(conv, conv_general_dilated=cpu_convs.matmul_conv)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
        dtype=dtype, param_dtype=jnp.float32, axis_name=bn_axis_name)
    return conv, norm


def _pad(k: int):
    """torchvision's symmetric padding k // 2 on both spatial axes."""
    return ((k // 2, k // 2), (k // 2, k // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34); stride in the first."""
    features: int
    strides: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    zero_init_residual: bool = False
    bn_axis_name: str | None = None
    matmul_convs: bool = False
    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv, norm = _layers(self.dtype, train, self.bn_axis_name, self.matmul_convs)
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        s = (self.strides, self.strides)
        y = conv(self.features, (3, 3), s, padding=_pad(3), name='conv1')(x)
        y = nn.relu(norm(name='bn1')(y))
        y = conv(self.features, (3, 3), padding=_pad(3), name='conv2')(y)
        y = norm(name='bn2', scale_init=last_scale)(y)
        if self.downsample:
            x = conv(self.features, (1, 1), s, padding='VALID', name='downsample_0')(x)
            x = norm(name='downsample_1')(x)
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (ResNet-50), v1.5: the stride sits in the 3x3 convolution."""
    features: int
    strides: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    zero_init_residual: bool = False
    bn_axis_name: str | None = None
    matmul_convs: bool = False
    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv, norm = _layers(self.dtype, train, self.bn_axis_name, self.matmul_convs)
        last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
        s = (self.strides, self.strides)
        out = self.features * self.expansion
        y = conv(self.features, (1, 1), padding='VALID', name='conv1')(x)
        y = nn.relu(norm(name='bn1')(y))
        y = conv(self.features, (3, 3), s, padding=_pad(3), name='conv2')(y)
        y = nn.relu(norm(name='bn2')(y))
        y = conv(out, (1, 1), padding='VALID', name='conv3')(y)
        y = norm(name='bn3', scale_init=last_scale)(y)
        if self.downsample:
            x = conv(out, (1, 1), s, padding='VALID', name='downsample_0')(x)
            x = norm(name='downsample_1')(x)
        return nn.relu(y + x)


class ResNet(nn.Module):
    """ResNet with torchvision's layout; `stem='small'` gives the 28 px demo network.

    `stem='imagenet'`: conv1 7x7/2 + maxpool 3x3/2 (torchvision). `stem='small'`: a single
    3x3/1 conv and no pooling, so 28x28 images keep 28/14/7 px maps in three stages.
    Stage i has `width * 2**i` channels (times the block's expansion).
    """
    block_cls: type
    stage_sizes: Sequence[int]
    num_classes: int
    width: int = 64
    stem: str = 'imagenet'
    dtype: Any = jnp.float32
    zero_init_residual: bool = False
    bn_axis_name: str | None = None
    matmul_convs: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        conv, norm = _layers(self.dtype, train, self.bn_axis_name, self.matmul_convs)
        x = jnp.asarray(x, self.dtype)
        if self.stem == 'imagenet':
            x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))  # -inf padding
        elif self.stem == 'small':
            x = conv(self.width, (3, 3), padding=_pad(3), name='conv1')(x)
            x = nn.relu(norm(name='bn1')(x))
        else:
            raise ValueError(f"stem must be 'imagenet' or 'small', got {self.stem!r}.")
        in_channels = self.width
        for i, num_blocks in enumerate(self.stage_sizes):
            features = self.width * 2 ** i
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                out_channels = features * self.block_cls.expansion
                needs_projection = strides != 1 or in_channels != out_channels
                x = self.block_cls(
                    features, strides=strides, downsample=needs_projection, dtype=self.dtype,
                    zero_init_residual=self.zero_init_residual, bn_axis_name=self.bn_axis_name,
                    matmul_convs=self.matmul_convs,
                    name=f'layer{i + 1}_{j}')(x, train)
                in_channels = out_channels
        # Pool in float32: the penultimate features feed Mahalanobis/ViM statistics.
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=FC_INIT, name='fc')(features)
        if return_features:
            return logits, features
        return logits


# name -> (block, stage sizes, stem); width comes from the config.
ARCHITECTURES = {
    'resnet18': (BasicBlock, (2, 2, 2, 2), 'imagenet'),
    'resnet34': (BasicBlock, (3, 4, 6, 3), 'imagenet'),
    'resnet50': (Bottleneck, (3, 4, 6, 3), 'imagenet'),
    'small_cnn': (BasicBlock, (1, 1, 1), 'small'),
}
