"""Shared pieces of the project's TFDS builders for the offline 28 px demo sets."""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lmoe_jax.data import provenance


class SourceDirBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that reads ``SOURCE_FILES`` from a local (or gs://) directory; no download.

    ``source_dir=None`` means the class's ``DEFAULT_SOURCE_DIR``. The files are read when the
    dataset is prepared; ``source()`` lets ``sources.open_builder`` check later that a prepared
    copy still matches them (provenance.py).
    """

    DEFAULT_SOURCE_DIR: Optional[str] = None
    SOURCE_FILES: tuple = ()

    def __init__(self, *, source_dir: Optional[epath.PathLike] = None, **kwargs):
        self.source_dir = source_dir or self.DEFAULT_SOURCE_DIR
        super().__init__(**kwargs)

    def source(self) -> provenance.Source:
        return provenance.source_in(self.source_dir, self.SOURCE_FILES)

    def _source_path(self, filename: str, what: str) -> epath.Path:
        path = epath.Path(self.source_dir or '.') / filename
        if not self.source_dir or not path.exists():
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
