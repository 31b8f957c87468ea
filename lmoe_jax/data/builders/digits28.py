"""scikit-learn's bundled handwritten digits (8x8, 1797 images) as 28x28 MNIST-like images.

A coarse OOD set for the Fashion-MNIST demo that needs no download. Each 8x8 digit (values
0..16) is scaled to 0..255, resized to 20x20 (bilinear) and centred in a 28x28 black frame,
the way MNIST centres its 20x20 digits.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from lmoe_jax.data import provenance
from lmoe_jax.data.builders.common import ProjectBuilder, image_examples

SKLEARN_FILE = 'digits.csv.gz'  # what load_digits reads, in sklearn/datasets/data/


def digits_to_28px(digits_8x8: np.ndarray) -> np.ndarray:
    """[N, 8, 8] values 0..16 -> [N, 28, 28] uint8, the digit 20x20 in the centre."""
    out = np.zeros((len(digits_8x8), 28, 28), dtype=np.uint8)
    for i, digit in enumerate(digits_8x8):
        small = Image.fromarray(np.clip(digit * (255.0 / 16.0), 0, 255).round().astype(np.uint8))
        out[i, 4:24, 4:24] = np.asarray(small.resize((20, 20), Image.BILINEAR))
    return out


class Digits28(ProjectBuilder):
    """sklearn digits resized to 28x28; one split 'test' (it is a coarse OOD test set)."""

    TRAIN_SPLIT = 'test'  # one split: used as coarse OOD

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'sklearn load_digits, 20x20 bilinear in a 28x28 frame.'}

    def source(self) -> provenance.Source:
        """scikit-learn's bundled digits file: a new scikit-learn with other data is noticed."""
        spec = importlib.util.find_spec('sklearn')  # found without importing scikit-learn
        directory = None
        if spec is not None and spec.submodule_search_locations:
            directory = epath.Path(list(spec.submodule_search_locations)[0]) / 'datasets' / 'data'
        return provenance.source_in(directory, (SKLEARN_FILE,))

    def _info(self):
        return self.dataset_info_from_configs(
            description='scikit-learn digits (UCI optical recognition) resized to 28x28.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(28, 28, 1)),
                'label': tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset',
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
        digits = load_digits()
        return {'test': self._generate_examples(digits_to_28px(digits.images), digits.target)}

    def _generate_examples(self, images, labels):
        yield from image_examples(images, labels)
