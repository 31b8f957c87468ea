"""The real offline demo sets (installed by scripts/setup.sh) load through the pipelines.

Prepared once into the pytest cache (.pytest_cache/d/lmoe_tfds), so later runs only read them.
Reference counts come straight from the source files (gzip + numpy, sklearn, pickle).
"""
import gzip
import os
import pickle

import ml_collections
import numpy as np
import pytest

from lmoe_jax import data
from lmoe_jax.data.builders.animal_mnist import _wheel_data_dir

FASHION_DIR = '/usr/share/datasets/fashion-mnist'
ID_CLASSES = (0, 1, 2, 3, 8, 9)  # T-shirt/top, Trouser, Pullover, Dress, Bag, Ankle boot
installed = os.path.exists(os.path.join(FASHION_DIR, 't10k-labels-idx1-ubyte.gz')) and _wheel_data_dir()


def _idx_labels(name):
    with gzip.open(os.path.join(FASHION_DIR, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=8)


def _idx_images(name):
    with gzip.open(os.path.join(FASHION_DIR, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)


@pytest.mark.skipif(not installed, reason='demo data not installed: run `bash scripts/setup.sh`')
def test_demo_sets_load_for_real(request, tmp_path):
    cache = getattr(request.config, 'cache', None)
    data_dir = str(cache.mkdir('lmoe_tfds')) if cache is not None else str(tmp_path)
    cfg = ml_collections.ConfigDict(dict(
        dataset='fashion_mnist_idx', data_dir=data_dir, fashion_mnist_dir=FASHION_DIR,
        num_classes=10, num_id_classes=6, split=0, id_classes=list(ID_CLASSES),
        outlier_dataset='animal_mnist', coarse_ood=('digits28',), val_fraction=0.0,
        image_size=28, resize_size=None, grayscale=True, normalize='none', color_jitter=False,
        random_flip=True, shuffle_buffer=1000))
    train_labels, test_labels = _idx_labels('train-labels-idx1-ubyte.gz'), _idx_labels('t10k-labels-idx1-ubyte.gz')

    info = data.dataset_info(cfg, process_count=1)
    assert info.train_size == int(np.isin(train_labels, ID_CLASSES).sum()) == 36000
    assert info.class_split.ood_classes == (4, 5, 6, 7) and info.image_shape == (28, 28, 1)

    stream = data.train_stream(cfg, batch_size=32, seed=0, process_index=0, process_count=1)
    batch = next(stream)
    assert batch['image'].shape == batch['ood_image'].shape == (32, 28, 28, 1)
    assert 0.0 <= batch['image'].min() and batch['image'].max() <= 1.0

    sets = {s.name: s for s in data.eval_datasets(cfg, batch_size=500, process_index=0, process_count=1)}
    assert sets['id_test'].num_examples == int(np.isin(test_labels, ID_CLASSES).sum())
    assert sets['fine_ood_test'].num_examples == int((~np.isin(test_labels, ID_CLASSES)).sum())
    from sklearn.datasets import load_digits
    assert sets['digits28'].num_examples == len(load_digits().target)

    source = _idx_images('t10k-images-idx3-ubyte.gz')
    label_of = {img.tobytes(): int(lab) for img, lab in zip(source, test_labels)}
    first = next(sets['id_test'].batches())
    for image, label in zip(first['image'], first['label']):
        original = label_of[np.rint(image[..., 0] * 255).astype(np.uint8).tobytes()]
        assert ID_CLASSES[label] == original

    with gzip.open(os.path.join(_wheel_data_dir(), 'animal_data_version_3.gz')) as f:
        animals = pickle.load(f)  # the installed wheel's own file, as its loader reads it
    distinct = len(np.unique(animals.reshape(len(animals), -1), axis=0))
    ood = data.open_builder('animal_mnist', cfg)
    assert ood.info.splits['train'].num_examples == distinct
