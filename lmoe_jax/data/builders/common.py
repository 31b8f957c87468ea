"""Shared pieces of the project's TFDS builders for the offline 28 px demo sets."""
from __future__ import annotations

import os
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds


class SourceDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that reads files from a local directory given at construction (no download).

    ``source_dir=None`` means the class's ``DEFAULT_SOURCE_DIR``. The directory only matters when
    the dataset is prepared; a prepared dataset is read from ``data_dir`` alone.
    """

    DEFAULT_SOURCE_DIR: Optional[str] = None

    def __init__(self, *, source_dir: Optional[str] = None, **kwargs):
        self.source_dir = source_dir or self.DEFAULT_SOURCE_DIR
        super().__init__(**kwargs)

    def _source_path(self, filename: str, what: str) -> str:
        path = os.path.join(self.source_dir or '', filename)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f'{self.name}: missing {path}. {what} '
                f'Then run again (or pass another directory as source_dir).')
        return path

    def _generate_examples(self, images, labels):
        yield from image_examples(images, labels)


def image_examples(images: np.ndarray, labels: Optional[np.ndarray] = None,
                   key_prefix: str = '') -> Iterator[tuple[str, dict]]:
    """(key, example) pairs for [N, H, W(, C)] uint8 images; keys keep the source index."""
    if images.ndim == 3:
        images = images[..., None]
    for i, image in enumerate(images):
        example = {'image': image}
        if labels is not None:
            example['label'] = int(labels[i])
        yield f'{key_prefix}{i:06d}', example
