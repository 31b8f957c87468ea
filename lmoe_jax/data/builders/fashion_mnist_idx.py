"""Fashion-MNIST read from local idx files (e.g. the Debian package ``dataset-fashion-mnist``).

TFDS's own ``fashion_mnist`` downloads and checks fixed checksums, which the Debian package's
re-gzipped files do not match; this builder reads the idx content itself and validates it.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from lmoe_jax.data.builders.common import SourceDirBuilder
from lmoe_jax.data.files import DataFileError, read_idx

CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
               'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
INSTALL_HINT = ('Install the Debian package dataset-fashion-mnist '
                '(`sudo apt-get install dataset-fashion-mnist`, or `bash scripts/setup.sh`), or put '
                'the four Fashion-MNIST idx files (train-images-idx3-ubyte.gz, '
                'train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) '
                'in a directory and set config.data.fashion_mnist_dir to it.')


class FashionMnistIdx(SourceDirBuilder):
    """Fashion-MNIST (Xiao et al. 2017), 10 classes of 28x28 grey clothing images."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Read from local idx files.'}
    DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
    SOURCE_FILES = tuple(name for pair in FILES.values() for name in pair)
    SOURCE_DIR_KNOB = 'fashion_mnist_dir'

    def _info(self):
        return self.dataset_info_from_configs(
            description='Fashion-MNIST from local idx files (60k train, 10k test).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(28, 28, 1)),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://github.com/zalandoresearch/fashion-mnist',
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        arrays = {split: self._load(split) for split in FILES}  # validate all before writing
        return {split: self._generate_examples(images, labels) for split, (images, labels) in arrays.items()}

    def _load(self, split):
        image_name, label_name = FILES[split]
        image_path = self._source_path(image_name, INSTALL_HINT)
        label_path = self._source_path(label_name, INSTALL_HINT)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
            raise DataFileError(f'{image_path} must hold uint8 images [N, 28, 28], '
                                f'found {images.dtype} {images.shape}.')
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataFileError(f'{label_path} holds {labels.shape} labels for {len(images)} '
                                f'images in {image_path}; the two files do not belong together.')
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise DataFileError(f'{label_path} has labels outside 0..9; it is not Fashion-MNIST.')
        return images, labels
