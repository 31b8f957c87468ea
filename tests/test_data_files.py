"""Raw file readers: idx files and the array-only unpickler, including refused bad files."""
import gzip
import os
import pickle

import numpy as np
import pytest

from data_fixtures import malicious_pickle_bytes, write_idx
from lmoe_jax.data.files import DataFileError, load_array_pickle, read_idx


def test_read_idx_roundtrip_gz_and_plain(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for gz in (True, False):
        path = str(tmp_path / f'a{gz}.idx')
        write_idx(path, array, gz=gz)
        np.testing.assert_array_equal(read_idx(path), array)


def test_read_idx_refuses_truncated_data(tmp_path):
    path = str(tmp_path / 'images-idx3-ubyte.gz')
    write_idx(path, np.zeros((5, 28, 28), np.uint8))
    raw = gzip.decompress(open(path, 'rb').read())
    with open(path, 'wb') as f:
        f.write(gzip.compress(raw[:-100]))
    with pytest.raises(DataFileError, match='images-idx3-ubyte.gz is truncated'):
        read_idx(path)


def test_read_idx_refuses_cut_gzip_and_bad_magic(tmp_path):
    path = str(tmp_path / 'cut.gz')
    write_idx(path, np.zeros((50, 28, 28), np.uint8))
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DataFileError, match='cut.gz is a truncated or corrupt gzip'):
        read_idx(path)
    bad = tmp_path / 'bad.idx'
    bad.write_bytes(b'\x01\x02\x08\x01' + b'\x00' * 8)
    with pytest.raises(DataFileError, match='bad.idx is not an idx file'):
        read_idx(str(bad))


def test_array_pickle_loads_arrays_of_numpy_pickles(tmp_path):
    array = np.random.RandomState(0).randint(0, 255, size=(7, 28, 28)).astype(np.uint8)
    path = str(tmp_path / 'ok.gz')
    with gzip.open(path, 'wb') as f:
        pickle.dump(array, f, protocol=4)
    np.testing.assert_array_equal(load_array_pickle(path), array)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = str(tmp_path / 'pwned')
    path = str(tmp_path / 'evil.gz')
    with gzip.open(path, 'wb') as f:
        f.write(malicious_pickle_bytes(marker))
    with pytest.raises(DataFileError, match=r'evil.gz is refused: its pickle references io.open'):
        load_array_pickle(path)
    assert not os.path.exists(marker)


def test_pickle_of_non_array_is_refused(tmp_path):
    path = str(tmp_path / 'list.gz')
    with gzip.open(path, 'wb') as f:
        pickle.dump([1, 2, 3], f)
    with pytest.raises(DataFileError, match='list.gz is refused: it must hold one numeric numpy array'):
        load_array_pickle(path)
    truncated = str(tmp_path / 'trunc.pkl')
    with open(truncated, 'wb') as f:
        f.write(pickle.dumps(np.zeros(100))[:50])
    with pytest.raises(DataFileError, match='trunc.pkl is truncated or corrupt'):
        load_array_pickle(truncated)
