"""Reading trees of image files for the outlier builders (WebVision, any folder of images).

Images are stored as their original bytes when TensorFlow decodes the format (JPEG, PNG, BMP,
WebP; any colour mode, CMYK and grey JPEGs included), whatever the file name says (a PNG named
.jpg stays a PNG). Formats TensorFlow cannot decode (TIFF, PPM/PGM, GIF animations) are converted
once, at preparation, to PNG with PIL. A file that is no image at all is skipped and counted.
"""
from __future__ import annotations

import concurrent.futures
import io
from typing import Iterable, Iterator, Optional

from etils import epath

# The extensions torchvision's ImageFolder accepts (MixOE's WebVision() reads through it),
# compared in lower case as torchvision does.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

# Leading bytes of the formats tf.io.decode_image reads and the pipeline keeps as they are.
_KEPT_MAGIC = (b'\xff\xd8\xff', b'\x89PNG\r\n\x1a\n', b'BM')
_READ_THREADS = 16  # image files are read in parallel: a win on gs:// and network disks
_CHUNK = 256  # paths per batch of parallel reads (bounds the bytes held in memory)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def image_paths(root: epath.Path) -> list[tuple[str, epath.Path]]:
    """(path relative to ``root``, path) of every image file below ``root``, sorted, any depth."""
    found = []
    for directory, _, names in root.walk():
        for name in names:
            if is_image_name(name):
                path = epath.Path(directory) / name
                found.append((str(path.relative_to(root)), path))
    return sorted(found)


def _keeps_bytes(data: bytes) -> bool:
    if data.startswith(_KEPT_MAGIC):
        return True
    return data[:4] == b'RIFF' and data[8:12] == b'WEBP'


def stored_bytes(data: bytes) -> Optional[bytes]:
    """What the builders store for a file's bytes: the bytes themselves when TensorFlow decodes
    the format, else a PNG made by PIL (first frame); None when PIL cannot read it either."""
    if _keeps_bytes(data):
        return data
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)
            rgb = image.convert('L' if image.mode in ('1', 'L', 'I', 'I;16', 'F') else 'RGB')
            out = io.BytesIO()
            rgb.save(out, format='PNG')
            return out.getvalue()
    except (OSError, SyntaxError, ValueError):
        return None


def _load(path: epath.Path) -> Optional[bytes]:
    try:
        return stored_bytes(path.read_bytes())
    except OSError:
        return None


def read_images(paths: Iterable[epath.Path]) -> Iterator[tuple[epath.Path, Optional[bytes]]]:
    """(path, stored bytes or None) for each path, in order, read by a small thread pool."""
    paths = list(paths)
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        for start in range(0, len(paths), _CHUNK):
            chunk = paths[start:start + _CHUNK]
            yield from zip(chunk, pool.map(_load, chunk))
