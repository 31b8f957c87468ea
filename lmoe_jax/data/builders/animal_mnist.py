"""Animal-MNIST (the ``animal-mnist`` wheel): 28x28 grey animal silhouettes, the demo's outliers.

The wheel ships its arrays as gzipped pickles. They are read with an unpickler that can only
rebuild numpy arrays, so a tampered file cannot run code. Exact duplicate images are dropped
(the first occurrence is kept) so the outlier stream does not over-weight them.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from lmoe_jax.data.builders.common import SourceDirBuilder
from lmoe_jax.data.files import DataFileError, load_array_pickle

# Order as the package's description lists them; the wheel itself stores only integer labels.
CLASS_NAMES = ('bear', 'bird', 'cat', 'cow', 'dog', 'elephant', 'giraffe', 'horse', 'sheep', 'zebra')
DATA_FILE = 'animal_data_version_3.gz'
LABEL_FILE = 'animal_label_version_3.gz'
INSTALL_HINT = ('Install the wheel without its dependencies (it asks for the full `tensorflow`, '
                'which would sit beside tensorflow-cpu): `.venv/bin/pip install --no-deps '
                'animal-mnist==0.4` (scripts/setup.sh does this), or copy its '
                f'data/Animal_MNIST/{DATA_FILE} and {LABEL_FILE} into a directory and pass it as '
                'config.data.animal_mnist_dir.')


def _wheel_data_dir() -> Optional[epath.Path]:
    """Where the installed wheel keeps its data files, found without importing it."""
    spec = importlib.util.find_spec('animal_mnist')
    if spec is None or not spec.submodule_search_locations:
        return None
    return epath.Path(list(spec.submodule_search_locations)[0]) / 'data' / 'Animal_MNIST'


def first_occurrences(images: np.ndarray) -> np.ndarray:
    """Sorted indices of the first occurrence of each distinct image."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    _, first = np.unique(flat, axis=0, return_index=True)
    return np.sort(first)


class AnimalMnist(SourceDirBuilder):
    """Animal-MNIST 0.4, duplicates removed; one split 'train' (it is used as outliers)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'From the animal-mnist 0.4 wheel, exact duplicates dropped.'}
    SOURCE_FILES = (DATA_FILE, LABEL_FILE)
    SOURCE_DIR_KNOB = 'animal_mnist_dir'
    TEST_SPLIT = 'train'  # one split: used as outliers

    def __init__(self, *, source_dir: Optional[epath.PathLike] = None, **kwargs):
        super().__init__(source_dir=source_dir or _wheel_data_dir(), **kwargs)

    def _info(self):
        return self.dataset_info_from_configs(
            description='Animal-MNIST: 10 classes of 28x28 grey animal silhouettes, deduplicated.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(28, 28, 1)),
                'label': tfds.features.ClassLabel(names=CLASS_NAMES),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://pypi.org/project/animal-mnist/',
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        data_path = self._source_path(DATA_FILE, INSTALL_HINT)
        label_path = self._source_path(LABEL_FILE, INSTALL_HINT)
        images, labels = load_array_pickle(data_path), load_array_pickle(label_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataFileError(f'{data_path} must hold images [N, 28, 28], found {images.shape}.')
        if labels.shape != (len(images),):
            raise DataFileError(f'{label_path} holds {labels.shape} labels for {len(images)} images.')
        if images.dtype != np.uint8:
            if images.min() < 0 or images.max() > 255:
                raise DataFileError(f'{data_path} has pixel values outside 0..255.')
            images = images.astype(np.uint8)
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise DataFileError(f'{label_path} has labels outside 0..9.')
        keep = first_occurrences(images)
        return {'train': self._generate_examples(images[keep], labels[keep])}
