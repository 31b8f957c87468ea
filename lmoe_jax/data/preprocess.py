"""Image decoding and the train / eval transforms, as tf.data map functions.

Train randomness is stateless: every random op takes a seed derived from (run seed, stream,
process, epoch, position in the epoch), so any batch can be rebuilt exactly without replaying
the ones before it. Large images follow MixOE: resize to a square ``resize_size``, random crop
``image_size``, horizontal flip, colour jitter in torchvision's sense (multiplicative brightness
and saturation factors); eval resizes and centre-crops. Small grey images (28 px) are only
flipped and, when ``crop_padding > 0``, padded and randomly cropped back.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import tensorflow as tf

from lmoe_jax.data.sources import _get

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BRIGHTNESS = 32.0 / 255.0  # MixOE: ColorJitter(brightness=32/255, saturation=0.5)
SATURATION = 0.5
NORMALIZATIONS = ('imagenet', 'none')


@dataclasses.dataclass(frozen=True)
class Transform:
    """What the model expects: the knobs of ``config.data`` that shape an image."""

    image_size: int
    resize_size: Optional[int]  # None/0: keep the native size (28 px sets)
    channels: int  # 1 (grey) or 3
    normalize: str = 'imagenet'
    color_jitter: bool = True
    random_flip: bool = True
    crop_padding: int = 0  # train only: pad then random-crop back to image_size

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"config.data.normalize={self.normalize!r}; use one of {NORMALIZATIONS}.")
        if self.channels not in (1, 3):
            raise ValueError(f'channels must be 1 or 3, got {self.channels}.')
        if int(self.image_size) <= 0:
            raise ValueError(f'config.data.image_size={self.image_size} must be positive.')
        if self.resize_size and int(self.resize_size) < int(self.image_size):
            raise ValueError(f'config.data.resize_size={self.resize_size} is smaller than '
                             f'image_size={self.image_size}; crops are taken from the resized image.')

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (int(self.image_size), int(self.image_size), int(self.channels))


def transform_from_config(cfg) -> Transform:
    """The Transform of a ``config.data`` (a ConfigDict, mapping or object with these fields)."""
    get = functools.partial(_get, cfg)
    return Transform(
        image_size=int(get('image_size', 448)),
        resize_size=get('resize_size', None) or None,
        channels=1 if get('grayscale', False) else 3,
        normalize=get('normalize', 'imagenet'),
        color_jitter=bool(get('color_jitter', True)),
        random_flip=bool(get('random_flip', True)),
        crop_padding=int(get('crop_padding', 0) or 0),
    )


def decode(encoded: tf.Tensor, channels: int) -> tf.Tensor:
    """Encoded bytes (JPEG/PNG/...) -> uint8 [H, W, channels]; grey/colour converted as needed."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    return image


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """Square resize (aspect not kept, as MixOE's Resize((512, 512))); a no-op at that size."""
    static = image.shape
    if static[0] == size and static[1] == size:
        return image
    return tf.image.resize(image, (size, size), method='bilinear', antialias=True)


def _normalize(image: tf.Tensor, t: Transform) -> tf.Tensor:
    if t.normalize == 'none':
        return image
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if t.channels == 1:  # grey: the mean of the ImageNet channel statistics
        mean, std = (sum(mean) / 3.0,), (sum(std) / 3.0,)
    return (image - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def _to_unit_float(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(image, tf.float32) / 255.0


def _centre_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top:top + size, left:left + size, :]


def eval_transform(image: tf.Tensor, t: Transform) -> tf.Tensor:
    """uint8 [H, W, C] -> float32 [S, S, C]: resize, centre crop, normalise."""
    image = _to_unit_float(image)
    if t.resize_size:
        image = _resize(image, int(t.resize_size))
    image = _centre_crop(image, int(t.image_size))
    image = tf.ensure_shape(image, t.image_shape)
    return _normalize(image, t)


def train_transform(image: tf.Tensor, seed: tf.Tensor, t: Transform) -> tf.Tensor:
    """uint8 [H, W, C] -> float32 [S, S, C] with stateless randomness from ``seed`` (int64 [2])."""
    crop_seed, pad_seed, flip_seed, jitter_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=4))
    image = _to_unit_float(image)
    if t.resize_size:
        image = _resize(image, int(t.resize_size))
    size = int(t.image_size)
    image = tf.image.stateless_random_crop(image, (size, size, t.channels), seed=crop_seed)
    if t.crop_padding:
        pad = int(t.crop_padding)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        image = tf.image.stateless_random_crop(image, (size, size, t.channels), seed=pad_seed)
    if t.random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    if t.color_jitter:
        image = _color_jitter(image, jitter_seed, t.channels)
    image = tf.ensure_shape(image, t.image_shape)
    return _normalize(image, t)


def _color_jitter(image: tf.Tensor, seed: tf.Tensor, channels: int) -> tf.Tensor:
    """torchvision ColorJitter(brightness, saturation): scale by a factor, blend with grey."""
    factors = tf.random.stateless_uniform([2], seed=seed, minval=-1.0, maxval=1.0)
    image = tf.clip_by_value(image * (1.0 + BRIGHTNESS * factors[0]), 0.0, 1.0)
    if channels == 3:
        grey = tf.image.rgb_to_grayscale(image)
        image = tf.clip_by_value(grey + (1.0 + SATURATION * factors[1]) * (image - grey), 0.0, 1.0)
    return image
