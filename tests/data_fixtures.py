"""Small fake source files for the data tests, written with plain numpy / gzip / pickle / PIL.

Fake images carry their identity in flip-invariant rows, so a test can read back which example
a batch row came from: row 0 = index % 256, row 1 = index // 256, row 2 = 20 * label.
"""
import gzip
import io
import os
import pickle
import struct
import tarfile

import numpy as np


def tagged_images(num: int, labels: np.ndarray, offset: int = 0) -> np.ndarray:
    images = np.random.RandomState(num + offset).randint(0, 256, size=(num, 28, 28)).astype(np.uint8)
    index = np.arange(num) + offset
    images[:, 0, :] = (index % 256)[:, None]
    images[:, 1, :] = (index // 256)[:, None]
    images[:, 2, :] = (20 * labels)[:, None]
    return images


def decode_tags(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, label) of tagged float images in [0, 1] ([B, 28, 28, 1])."""
    pixels = np.rint(images[..., 0] * 255.0).astype(np.int64)
    return pixels[:, 0, 0] + 256 * pixels[:, 1, 0], pixels[:, 2, 0] // 20


def write_idx(path: str, array: np.ndarray, gz: bool = True) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    raw = struct.pack('>BBBB', 0, 0, code, array.ndim)
    raw += struct.pack('>' + 'I' * array.ndim, *array.shape) + array.tobytes()
    with open(path, 'wb') as f:
        f.write(gzip.compress(raw) if gz else raw)


FASHION_FILES = {'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
                 'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}


def write_fake_fashion(directory: str, num_train: int = 120, num_test: int = 50) -> dict:
    """Four idx files like the Debian package's; labels cycle 0..9. Returns the arrays."""
    os.makedirs(directory, exist_ok=True)
    out = {}
    for split, num, offset in (('train', num_train, 0), ('test', num_test, 1000)):
        labels = (np.arange(num) % 10).astype(np.uint8)
        images = tagged_images(num, labels, offset)
        image_file, label_file = FASHION_FILES[split]
        write_idx(os.path.join(directory, image_file), images)
        write_idx(os.path.join(directory, label_file), labels)
        out[split] = (images, labels)
    return out


def write_fake_animals(directory: str, num: int = 40, duplicates: int = 5) -> np.ndarray:
    """Animal-MNIST-like gzipped pickles; the last ``duplicates`` images repeat the first ones."""
    os.makedirs(directory, exist_ok=True)
    labels = np.arange(num) % 10
    images = tagged_images(num, labels, offset=5000)
    images[num - duplicates:] = images[:duplicates]
    with gzip.open(os.path.join(directory, 'animal_data_version_3.gz'), 'wb') as f:
        pickle.dump(images, f)
    with gzip.open(os.path.join(directory, 'animal_label_version_3.gz'), 'wb') as f:
        pickle.dump(labels.astype(np.int64), f)
    return images


class _RunsCode:
    """Unpickling this calls open(marker, 'w'): proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def malicious_pickle_bytes(marker: str) -> bytes:
    return pickle.dumps(_RunsCode(marker))


def jpeg_bytes(height: int, width: int, seed: int) -> bytes:
    from PIL import Image
    array = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='JPEG')
    return buffer.getvalue()


def write_fake_aircraft_archive(directory: str, train: int = 6, test: int = 4,
                                corrupt_id: str | None = None) -> str:
    """A tiny fgvc-aircraft-2013b.tar.gz: 100 variants, a few 12x16 JPEGs, optional corrupt one."""
    os.makedirs(directory, exist_ok=True)
    variants = [f'Variant {i:03d}' for i in range(100)]
    files = {'variants.txt': '\n'.join(variants) + '\n'}
    images = {}
    for name, count, start in (('trainval', train, 0), ('test', test, 100)):
        lines = []
        for j in range(count):
            image_id = f'{1000000 + start + j}'
            lines.append(f'{image_id} {variants[(start + j) % 100]}')
            images[image_id] = jpeg_bytes(12, 16, start + j)
        files[f'images_variant_{name}.txt'] = '\n'.join(lines) + '\n'
    if corrupt_id is not None:
        images[corrupt_id] = images[corrupt_id][:40]  # truncated JPEG
    path = os.path.join(directory, 'fgvc-aircraft-2013b.tar.gz')
    with tarfile.open(path, 'w:gz') as tar:
        entries = {f'fgvc-aircraft-2013b/data/{k}': v.encode() for k, v in files.items()}
        entries.update({f'fgvc-aircraft-2013b/data/images/{k}.jpg': v for k, v in images.items()})
        for name, content in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path
