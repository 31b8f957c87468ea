"""Shared pieces of the project's TFDS builders and how each one tells ``sources`` about itself.

Every project builder declares, as class attributes, what ``sources.open_builder`` needs:
``PREPARATION`` ('offline': built from local files, prepared on first use without asking;
'manual': read from the manual directory, with ``MANUAL_DOWNLOAD_INSTRUCTIONS`` saying what to
place there), ``SOURCE_DIR_KNOB`` (the config.data knob holding its source directory) and
``TRAIN_SPLIT`` / ``TEST_SPLIT``. Builders never import ``sources``.
"""
from __future__ import annotations

import concurrent.futures
import io
import socket
from typing import Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from lmoe_jax.data import provenance
from lmoe_jax.data.builders import image_files
from lmoe_jax.data.files import DataFileError


PREPARATIONS = ('offline', 'manual')


class ProjectBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """The registration attributes every project builder has (defaults: an offline builder)."""

    PREPARATION: str = 'offline'
    SOURCE_DIR_KNOB: Optional[str] = None  # config.data.<knob> -> the ``source_dir`` kwarg
    TRAIN_SPLIT: str = 'train'
    TEST_SPLIT: str = 'test'
    FILE_NAME_FEATURE: Optional[str] = None  # relative image path, for image lists (image_lists.py)
    NEEDS_IMAGE_LISTS: bool = False  # no official split: config.data.image_lists gives them


def can_reach(host: str, timeout_s: float = 5.0) -> bool:
    """Whether ``host`` resolves: a quick offline check before TFDS starts long download retries."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout_s)
        return True
    except Exception:  # noqa: BLE001 - unresolvable or slow both mean "do not try"
        return False
    finally:
        pool.shutdown(wait=False)


class SourceDirBuilder(ProjectBuilder, skip_registration=True):
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


class ManualDirBuilder(ProjectBuilder, skip_registration=True):
    """A builder that reads a download the user placed in the manual directory.

    ``manual_dir=None`` means TFDS's default ``<data_dir>/downloads/manual``. Subclasses set
    ``MANUAL_DOWNLOAD_INSTRUCTIONS`` (what to download from where, and the layout expected).
    ``allow_download`` is False when config.data.download is False; builders without a public
    URL ignore it.
    """

    PREPARATION = 'manual'

    def __init__(self, *, allow_download: bool = True,
                 manual_dir: Optional[epath.PathLike] = None, **kwargs):
        self.allow_download = allow_download
        self._manual_dir = manual_dir
        super().__init__(**kwargs)

    @property
    def manual_root(self) -> epath.Path:
        """The manual directory: the one given, else TFDS's default <data_dir>/downloads/manual."""
        if self._manual_dir:
            return epath.Path(self._manual_dir)
        return epath.Path(self.data_dir_root) / 'downloads' / 'manual'

    def missing(self, what: str) -> FileNotFoundError:
        """The error for a missing or incomplete download: what is wrong, then the instructions."""
        return FileNotFoundError(f'{self.name}: {what}\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')


def files_under(root: epath.Path) -> dict:
    """Every file below ``root``, by its path relative to ``root`` (sorted)."""
    out = {}
    for directory, _, names in root.walk():
        for name in names:
            path = epath.Path(directory) / name
            out[str(path.relative_to(root))] = path
    return dict(sorted(out.items()))


def decodable(data: bytes) -> bool:
    """Whether PIL fully decodes ``data`` (a truncated JPEG or a non-image is not)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _checked_image(path: epath.Path) -> Optional[bytes]:
    try:
        data = image_files.stored_bytes(path.read_bytes())
    except OSError:
        return None
    return data if data is not None and decodable(data) else None


def checked_images(paths: Sequence[epath.Path], threads: int = 8,
                   chunk: int = 256) -> Iterator[tuple[epath.Path, Optional[bytes]]]:
    """(path, bytes to store or None) per path, in order: TensorFlow-decodable bytes (the file's
    own, or a PNG made once for formats TensorFlow cannot read; see image_files.stored_bytes),
    None when the file does not fully decode. Read and checked by a thread pool (PIL decodes
    without the GIL), a chunk at a time so memory stays bounded."""
    paths = list(paths)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(paths), chunk):
            part = paths[start:start + chunk]
            yield from zip(part, pool.map(_checked_image, part))


def read_text_lines(path: epath.Path) -> list[str]:
    """The non-empty lines of a text file, stripped (UTF-8; a BOM or CRLF endings are tolerated)."""
    text = epath.Path(path).read_text(encoding='utf-8-sig')
    return [line.strip() for line in text.splitlines() if line.strip()]


def id_pairs(path: epath.Path, what: str) -> list[tuple[str, str]]:
    """'<id> <value>' lines of an annotation file; the value may hold spaces."""
    pairs = []
    for line_no, line in enumerate(read_text_lines(path), 1):
        key, sep, value = line.partition(' ')
        if not sep or not value.strip():
            raise DataFileError(f'{path}:{line_no} must read "<id> <{what}>", got {line!r}.')
        pairs.append((key, value.strip()))
    return pairs
