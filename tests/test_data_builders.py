"""The project's TFDS builders, prepared from small fake source files the tests write."""
import gzip
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures as fx
from lmoe_jax.data import sources
from lmoe_jax.data.sources import DataConfigError, DatasetNotReadyError


def _cfg(tmp_path, **kw):
    return ml_collections.ConfigDict(dict(data_dir=str(tmp_path / 'tfds'), **kw))


def _all_examples(builder, split):
    rows = list(tfds.as_numpy(builder.as_dataset(split=split)))
    return np.stack([r['image'][..., 0] for r in rows]), np.array([r['label'] for r in rows])


def _sort_by_tag(images, labels):
    order = np.argsort(images[:, 0, 0].astype(int) + 256 * images[:, 1, 0].astype(int))
    return images[order], labels[order]


def test_fashion_idx_builder_reads_every_image_exactly(tmp_path):
    arrays = fx.write_fake_fashion(str(tmp_path / 'src'), num_train=30, num_test=12)
    builder = sources.open_builder('fashion_mnist_idx', _cfg(tmp_path, fashion_mnist_dir=str(tmp_path / 'src')))
    assert builder.info.features['label'].num_classes == 10
    for split in ('train', 'test'):
        images, labels = _sort_by_tag(*_all_examples(builder, split))
        np.testing.assert_array_equal(images, arrays[split][0])
        np.testing.assert_array_equal(labels, arrays[split][1])


def test_missing_fashion_files_name_them_and_leave_nothing(tmp_path):
    source = tmp_path / 'src'
    fx.write_fake_fashion(str(source), num_train=10, num_test=10)
    os.remove(source / 't10k-labels-idx1-ubyte.gz')
    cfg = _cfg(tmp_path, fashion_mnist_dir=str(source))
    with pytest.raises(DatasetNotReadyError) as err:
        sources.open_builder('fashion_mnist_idx', cfg)
    message = str(err.value)
    assert "'fashion_mnist_idx' is not prepared" in message
    assert 't10k-labels-idx1-ubyte.gz' in message and 'dataset-fashion-mnist' in message
    assert not tfds.builder('fashion_mnist_idx', data_dir=cfg.data_dir).is_prepared()


def test_truncated_fashion_file_is_refused_by_name(tmp_path):
    source = tmp_path / 'src'
    fx.write_fake_fashion(str(source), num_train=10, num_test=10)
    path = source / 'train-images-idx3-ubyte.gz'
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-28]))
    with pytest.raises(DatasetNotReadyError, match='train-images-idx3-ubyte.gz is truncated'):
        sources.open_builder('fashion_mnist_idx', _cfg(tmp_path, fashion_mnist_dir=str(source)))


def test_animal_builder_drops_exact_duplicates(tmp_path):
    images = fx.write_fake_animals(str(tmp_path / 'src'), num=40, duplicates=5)
    builder = sources.open_builder('animal_mnist', _cfg(tmp_path, animal_mnist_dir=str(tmp_path / 'src')))
    got, _ = _all_examples(builder, 'train')
    assert len(got) == 35
    expected_unique = {img.tobytes() for img in images}  # independent: set of distinct images
    assert {img.tobytes() for img in got} == expected_unique


def test_malicious_animal_pickle_is_refused(tmp_path):
    source = tmp_path / 'src'
    fx.write_fake_animals(str(source))
    marker = str(tmp_path / 'pwned')
    with gzip.open(source / 'animal_label_version_3.gz', 'wb') as f:
        f.write(fx.malicious_pickle_bytes(marker))
    with pytest.raises(DatasetNotReadyError, match='animal_label_version_3.gz is refused'):
        sources.open_builder('animal_mnist', _cfg(tmp_path, animal_mnist_dir=str(source)))
    assert not os.path.exists(marker)


def test_aircraft_from_manual_archive_skips_corrupt_image(tmp_path):
    manual = tmp_path / 'manual'
    fx.write_fake_aircraft_archive(str(manual), train=6, test=4, corrupt_id='1000003')
    builder = sources.open_builder('fgvc_aircraft', _cfg(tmp_path, manual_dir=str(manual), download=False))
    train = list(tfds.as_numpy(builder.as_dataset(split='train')))
    test = list(tfds.as_numpy(builder.as_dataset(split='test')))
    assert len(train) == 5 and len(test) == 4  # the truncated JPEG is skipped
    assert sorted(int(r['label']) for r in train) == [0, 1, 2, 4, 5]
    assert sorted(int(r['label']) for r in test) == [0, 1, 2, 3]
    assert {r['image'].shape for r in train} == {(12, 16, 3)}


def test_aircraft_without_archive_gives_manual_instructions(tmp_path):
    (tmp_path / 'manual').mkdir()
    with pytest.raises(DatasetNotReadyError) as err:
        sources.open_builder('fgvc_aircraft', _cfg(tmp_path, manual_dir=str(tmp_path / 'manual'), download=False))
    assert 'fgvc-aircraft-2013b.tar.gz' in str(err.value) and 'images_variant_trainval.txt' in str(err.value)


def test_unknown_dataset_and_wrong_class_count_fail_clearly(tmp_path):
    with pytest.raises(DataConfigError, match="Unknown dataset 'no_such_set'"):
        sources.open_builder('no_such_set', _cfg(tmp_path))
    builder = tfds.builder('digits28', data_dir=str(tmp_path / 'tfds'))
    with pytest.raises(DataConfigError, match='num_classes=12 but dataset .digits28. has 10'):
        sources.check_num_classes(builder, 'digits28', 12)


def test_catalog_dataset_not_prepared_and_no_download(tmp_path):
    with pytest.raises(DatasetNotReadyError) as err:
        sources.open_builder('cars196', _cfg(tmp_path, download=False))
    assert 'tfds build cars196' in str(err.value)


def test_catalog_dataset_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, 'can_reach', lambda host, timeout_s=5.0: False)
    with pytest.raises(DatasetNotReadyError) as err:
        sources.open_builder('stanford_dogs', _cfg(tmp_path))
    message = str(err.value)
    assert "'stanford_dogs' is not prepared" in message and 'no network' in message
    assert 'tfds build stanford_dogs' in message and 'stanford_dogs/' in message
