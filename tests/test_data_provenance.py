"""Prepared datasets remember their source: a changed directory or file is noticed, never reused.

Rebuilds are counted by wrapping the builders' ``_split_generators`` (the step that reads the
source files); the reference hashes are hashlib over the bytes the test wrote.
"""
import hashlib
import json
import logging
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_fixtures as fx
from lmoe_jax.data import builders, provenance, sources
from lmoe_jax.data.sources import DataConfigError

FASHION = 'fashion_mnist_idx'


@pytest.fixture
def builds(monkeypatch):
    """Counts how often each project builder reads its source files (= prepares)."""
    counts = {}
    for cls in (builders.FashionMnistIdx, builders.AnimalMnist, builders.Digits28,
                builders.FgvcAircraft):
        original = cls._split_generators

        def counted(self, dl_manager, _original=original):
            counts[self.name] = counts.get(self.name, 0) + 1
            return _original(self, dl_manager)
        monkeypatch.setattr(cls, '_split_generators', counted)
    return counts


def _cfg(tmp_path, **kw):
    return ml_collections.ConfigDict(dict(data_dir=str(tmp_path / 'tfds'), **kw))


def _train_images(builder):
    rows = list(tfds.as_numpy(builder.as_dataset(split='train')))
    images = np.stack([r['image'][..., 0] for r in rows])
    return images[np.argsort(images[:, 0, 0].astype(int) + 256 * images[:, 1, 0].astype(int))]


def _record(builder):
    return json.loads((builder.data_path / provenance.RECORD_NAME).read_text())


def test_unchanged_source_is_reused_without_rebuilding(tmp_path, builds):
    source = tmp_path / 'src'
    fx.write_fake_fashion(str(source), num_train=20, num_test=10)
    cfg = _cfg(tmp_path, fashion_mnist_dir=str(source))
    first = sources.open_builder(FASHION, cfg)
    again = sources.open_builder(FASHION, cfg)
    assert builds == {FASHION: 1}
    assert again.data_dir == first.data_dir
    record = _record(again)
    assert record['source'] == str(source.resolve())
    expected = {name: {'size': (source / name).stat().st_size,
                       'sha256': hashlib.sha256((source / name).read_bytes()).hexdigest()}
                for name in sorted(os.listdir(source))}
    assert record['files'] == expected


def test_other_directory_is_noticed_and_rebuilt(tmp_path, builds, caplog):
    fx.write_fake_fashion(str(tmp_path / 'a'), num_train=20, num_test=10)
    other = fx.write_fake_fashion(str(tmp_path / 'b'), num_train=30, num_test=10)
    sources.open_builder(FASHION, _cfg(tmp_path, fashion_mnist_dir=str(tmp_path / 'a')))
    with caplog.at_level(logging.WARNING):
        builder = sources.open_builder(FASHION, _cfg(tmp_path, fashion_mnist_dir=str(tmp_path / 'b')))
    assert builds == {FASHION: 2}
    assert 'Rebuilding' in caplog.text and 'source moved' in caplog.text
    np.testing.assert_array_equal(_train_images(builder), other['train'][0])
    assert _record(builder)['source'] == str((tmp_path / 'b').resolve())


def test_same_files_in_another_directory_are_still_noticed(tmp_path, builds):
    fx.write_fake_fashion(str(tmp_path / 'a'), num_train=20, num_test=10)
    fx.write_fake_fashion(str(tmp_path / 'copy'), num_train=20, num_test=10)  # same bytes
    sources.open_builder(FASHION, _cfg(tmp_path, fashion_mnist_dir=str(tmp_path / 'a')))
    sources.open_builder(FASHION, _cfg(tmp_path, fashion_mnist_dir=str(tmp_path / 'copy')))
    assert builds == {FASHION: 2}


def test_changed_file_content_is_noticed_at_same_size_and_mtime(tmp_path, builds):
    source = tmp_path / 'src'
    arrays = fx.write_fake_fashion(str(source), num_train=20, num_test=10)
    images_file = source / fx.FASHION_FILES['train'][0]
    fx.write_idx(str(images_file), arrays['train'][0], gz=False)  # plain idx: size is fixed
    cfg = _cfg(tmp_path, fashion_mnist_dir=str(source))
    sources.open_builder(FASHION, cfg)
    before = images_file.stat()
    changed = arrays['train'][0].copy()
    changed[3, 20, 20] ^= 0xFF  # one pixel of image 3
    fx.write_idx(str(images_file), changed, gz=False)
    os.utime(images_file, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert images_file.stat().st_size == before.st_size
    assert images_file.stat().st_mtime_ns == before.st_mtime_ns
    builder = sources.open_builder(FASHION, cfg)
    assert builds == {FASHION: 2}
    np.testing.assert_array_equal(_train_images(builder), changed)


def test_configured_directory_without_files_is_refused_and_copy_kept(tmp_path, builds):
    fx.write_fake_fashion(str(tmp_path / 'a'), num_train=20, num_test=10)
    sources.open_builder(FASHION, _cfg(tmp_path, fashion_mnist_dir=str(tmp_path / 'a')))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataConfigError) as err:
        sources.open_builder(FASHION, _cfg(tmp_path, fashion_mnist_dir=str(tmp_path / 'empty')))
    message = str(err.value)
    assert 'config.data.fashion_mnist_dir=' in message and 'train-images-idx3-ubyte.gz' in message
    assert str((tmp_path / 'a').resolve()) in message  # says what the copy was built from
    assert builds == {FASHION: 1}
    assert tfds.builder(FASHION, data_dir=str(tmp_path / 'tfds')).is_prepared()


def test_source_gone_from_recorded_directory_reuses_the_copy(tmp_path, builds):
    source = tmp_path / 'src'
    arrays = fx.write_fake_fashion(str(source), num_train=20, num_test=10)
    cfg = _cfg(tmp_path, fashion_mnist_dir=str(source))
    sources.open_builder(FASHION, cfg)
    for name in os.listdir(source):  # e.g. data_dir copied to a machine without the source
        os.remove(source / name)
    builder = sources.open_builder(FASHION, cfg)
    assert builds == {FASHION: 1}
    np.testing.assert_array_equal(_train_images(builder), arrays['train'][0])


def test_copy_without_record_is_rebuilt(tmp_path, builds):
    source = tmp_path / 'src'
    fx.write_fake_fashion(str(source), num_train=20, num_test=10)
    cfg = _cfg(tmp_path, fashion_mnist_dir=str(source))
    builder = sources.open_builder(FASHION, cfg)
    (builder.data_path / provenance.RECORD_NAME).unlink()  # prepared by older code
    builder = sources.open_builder(FASHION, cfg)
    assert builds == {FASHION: 2}
    assert _record(builder)['source'] == str(source.resolve())


def test_changed_animal_pickle_is_noticed(tmp_path, builds):
    source = tmp_path / 'animals'
    fx.write_fake_animals(str(source), num=20, duplicates=0)
    cfg = _cfg(tmp_path, animal_mnist_dir=str(source))
    sources.open_builder('animal_mnist', cfg)
    sources.open_builder('animal_mnist', cfg)
    fx.write_fake_animals(str(source), num=24, duplicates=0)
    builder = sources.open_builder('animal_mnist', cfg)
    assert builds == {'animal_mnist': 2}
    assert builder.info.splits['train'].num_examples == 24


def test_digits_record_names_sklearns_file(tmp_path, builds):
    import sklearn
    builder = sources.open_builder('digits28', _cfg(tmp_path))
    sources.open_builder('digits28', _cfg(tmp_path))
    assert builds == {'digits28': 1}
    path = os.path.join(os.path.dirname(sklearn.__file__), 'datasets', 'data', 'digits.csv.gz')
    with open(path, 'rb') as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    assert _record(builder)['files'] == {'digits.csv.gz': {'size': os.path.getsize(path),
                                                           'sha256': expected}}


def test_replaced_aircraft_archive_is_noticed(tmp_path, builds):
    manual = tmp_path / 'manual'
    fx.write_fake_aircraft_archive(str(manual), train=4, test=2)
    cfg = _cfg(tmp_path, manual_dir=str(manual), download=False)
    builder = sources.open_builder('fgvc_aircraft', cfg)
    archive = manual / 'fgvc-aircraft-2013b.tar.gz'
    assert _record(builder)['files'] == {archive.name: {
        'size': archive.stat().st_size, 'sha256': hashlib.sha256(archive.read_bytes()).hexdigest()}}
    sources.open_builder('fgvc_aircraft', cfg)
    assert builds == {'fgvc_aircraft': 1}
    fx.write_fake_aircraft_archive(str(manual), train=5, test=2)
    builder = sources.open_builder('fgvc_aircraft', cfg)
    assert builds == {'fgvc_aircraft': 2}
    assert builder.info.splits['train'].num_examples == 5
