"""Readers for the raw files of the offline datasets: idx (MNIST format) and array pickles.

Both refuse a bad file with its name: truncated gzip, wrong magic number, sizes that do not
add up, or a pickle that holds anything but numpy arrays.
"""
from __future__ import annotations

import gzip
import io
import pickle
import zlib

import numpy as np
from etils import epath


class DataFileError(ValueError):
    """A data file exists but cannot be used as it is."""


def read_maybe_gzip(path: epath.PathLike) -> bytes:
    """All bytes of ``path`` (local or gs://), gunzipped if it is gzip (by magic, not by name)."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f'{path} does not exist')
    raw = path.read_bytes()
    if raw[:2] != b'\x1f\x8b':
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataFileError(
            f'{path} is a truncated or corrupt gzip file ({e}); download or reinstall it.') from e


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def read_idx(path: epath.PathLike) -> np.ndarray:
    """An idx file (the MNIST format: 0, 0, dtype code, ndim, big-endian dims, data) as an array."""
    raw = read_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataFileError(f'{path} is not an idx file (bad magic number {raw[:4]!r}).')
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataFileError(f'{path} is truncated: its idx header is incomplete.')
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype='>u4'))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFileError(
            f'{path} is truncated or corrupt: header says shape {dims} ({expected} bytes) '
            f'but it holds {len(raw) - header} bytes of data.')
    return np.frombuffer(raw[header:], dtype=dtype).reshape(dims).astype(dtype.newbyteorder('='))


# The only globals an array pickle needs (numpy 1.x and 2.x spellings).
_ALLOWED_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'),
    ('numpy._core.multiarray', '_reconstruct'),
    ('numpy', 'ndarray'),
    ('numpy', 'dtype'),
    ('numpy.core.multiarray', 'scalar'),
    ('numpy._core.multiarray', 'scalar'),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else (no code can run)."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DataFileError(
                f'{self._source} is refused: its pickle references {module}.{name}, but only '
                'numpy arrays are allowed. Do not use this file; reinstall the package it came from.')
        try:
            from numpy._core import multiarray  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray
        return {'_reconstruct': multiarray._reconstruct, 'scalar': multiarray.scalar,
                'ndarray': np.ndarray, 'dtype': np.dtype}[name]

    def persistent_load(self, pid):
        raise DataFileError(f'{self._source} is refused: it uses pickle persistent ids.')


def load_array_pickle(path: epath.PathLike) -> np.ndarray:
    """A (gzipped) pickle that must hold exactly one numpy array, loaded without running code."""
    raw = read_maybe_gzip(path)
    try:
        obj = _ArrayOnlyUnpickler(io.BytesIO(raw), path).load()
    except DataFileError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DataFileError(f'{path} is truncated or corrupt: cannot unpickle it ({e}).') from e
    if not isinstance(obj, np.ndarray) or obj.dtype == object:
        raise DataFileError(
            f'{path} is refused: it must hold one numeric numpy array, found {type(obj).__name__}.')
    return obj
