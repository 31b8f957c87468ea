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


# --- fake downloads of MixOE's benchmarks, in the real layouts, with the real files' quirks ---
#
# Every image is one uniform colour, unique within a download, so a decoded batch row tells which
# file it came from. ``signature`` is the colour PIL decodes from the written bytes (what MixOE's
# loader, PIL's convert('RGB'), sees), independent of the code under test.

GREYS = (50, 90, 130, 170, 210)  # off the colour grid below in every channel
# Where each download's colours and grey levels start: unique across the three downloads.
FIRST = {'nabirds': (0, 0), 'butterfly200': (50, 2), 'stanford_cars': (100, 3)}


def colour_of(index: int) -> tuple:
    return (30 + 40 * (index % 6), 30 + 40 * ((index // 6) % 6), 30 + 40 * ((index // 36) % 6))


def quirky_image(kind: str, index: int, size=(16, 16)) -> bytes:
    """A uniform image: 'rgb' / 'cmyk' / 'grey' JPEG, 'png' (PNG bytes, to be named .jpg), or
    'truncated' (the first 40 bytes of a JPEG: does not decode)."""
    from PIL import Image
    height, width = size
    if kind == 'grey':
        image = Image.new('L', (width, height), GREYS[index % len(GREYS)])
    else:
        image = Image.new('RGB', (width, height), colour_of(index))
        if kind == 'cmyk':
            image = image.convert('CMYK')
    buffer = io.BytesIO()
    image.save(buffer, format='PNG' if kind == 'png' else 'JPEG', quality=95)
    data = buffer.getvalue()
    return data[:40] if kind == 'truncated' else data


def signature(data: bytes):
    """Mean RGB colour PIL decodes from ``data``, or None when it does not decode."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert('RGB'), np.float64).mean(axis=(0, 1))
    except OSError:
        return None


def identify(images: np.ndarray, expected: dict, tolerance: float = 6.0) -> list:
    """The file name of each [H, W, 3] image in [0, 1] (or uint8 when ``images`` is integer)
    by nearest colour signature; fails when none is within ``tolerance`` (of 255).

    Tolerance: a uniform block survives JPEG (quality 95) up to rounding, and PIL's and
    TensorFlow's decoders (IDCT, CMYK and YCbCr conversions) may differ by a few levels; resizing,
    cropping and flipping a uniform image keep its colour. Fixture colours are >= 20 apart, so 6
    cannot confuse two files."""
    names = list(expected)
    table = np.stack([expected[n] for n in names])
    scale = 1.0 if np.issubdtype(np.asarray(images).dtype, np.integer) else 255.0
    out = []
    for image in images:
        colour = np.asarray(image, np.float64).mean(axis=(0, 1)) * scale
        distance = np.abs(table - colour).max(axis=1)
        best = int(np.argmin(distance))
        assert distance[best] < tolerance, (colour, names[best], table[best])
        out.append(names[best])
    return out


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def _write_text(path: str, lines) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(''.join(f'{line}\n' for line in lines))


def _check_distinct(images: dict) -> None:
    colours = [v['signature'] for v in images.values() if v['signature'] is not None]
    for i, a in enumerate(colours):
        for b in colours[i + 1:]:
            assert np.abs(a - b).max() > 15, 'fixture colours must be distinct'


# NABirds: (class id, file below images/, quirk, is train). Class ids are sparse, like the
# release's leaf ids; one file name holds a space, one image sits one folder deeper.
NABIRDS_IMAGES = (
    (295, '0295/8a1c0b9e57d14b2f9a0c3d4e5f607182.jpg', 'rgb', True),
    (295, '0295/1b2c3d4e5f60718293a4b5c6d7e8f901.jpg', 'grey', True),
    (295, '0295/2c3d4e5f60718293a4b5c6d7e8f90123.jpg', 'rgb', False),
    (298, '0298/3d4e5f60718293a4b5c6d7e8f9012345.jpg', 'cmyk', True),
    (298, '0298/4e5f60718293a4b5c6d7e8f901234567.jpg', 'png', True),
    (298, '0298/5f60718293a4b5c6d7e8f90123456789.jpg', 'rgb', False),
    (817, '0817/with space 0a1b.jpg', 'rgb', True),
    (817, '0817/60718293a4b5c6d7e8f9012345678901.jpg', 'rgb', True),
    (817, '0817/718293a4b5c6d7e8f901234567890123.jpg', 'truncated', True),
    (817, '0817/8293a4b5c6d7e8f90123456789012345.jpg', 'rgb', False),
    (1005, '1005/sub/93a4b5c6d7e8f9012345678901234567.jpg', 'rgb', True),
    (1005, '1005/a4b5c6d7e8f901234567890123456789.jpg', 'grey', True),
    (1005, '1005/b5c6d7e8f90123456789012345678901.jpg', 'rgb', False),
)
NABIRDS_CLASSES = {0: 'Birds', 1: 'Ducks, Geese, and Swans', 295: 'Black-bellied Whistling-Duck',
                   298: 'Snow Goose', 817: 'Wood Duck (Female/Juvenile)', 1005: 'Song Sparrow'}


def write_fake_nabirds(root: str) -> dict:
    """nabirds/ as the release extracts: images/, images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt, hierarchy.txt. Returns {file: class_id, train, signature}."""
    out, lines = {}, {'images': [], 'labels': [], 'split': []}
    greys = 0
    for index, (class_id, name, kind, train) in enumerate(NABIRDS_IMAGES):
        image_id = f'{index:08x}-0000-4000-8000-{index:012x}'
        colour, grey = FIRST['nabirds']
        data = quirky_image(kind, grey + greys if kind == 'grey' else colour + index)
        greys += kind == 'grey'
        _write(os.path.join(root, 'images', name), data)
        lines['images'].append(f'{image_id} {name}')
        lines['labels'].append(f'{image_id} {class_id}')
        lines['split'].append(f'{image_id} {int(train)}')
        out[name] = {'class_id': class_id, 'train': train, 'signature': signature(data)}
    _write_text(os.path.join(root, 'images.txt'), lines['images'])
    _write_text(os.path.join(root, 'image_class_labels.txt'), lines['labels'])
    _write_text(os.path.join(root, 'train_test_split.txt'), lines['split'])
    _write_text(os.path.join(root, 'classes.txt'), [f'{k} {v}' for k, v in NABIRDS_CLASSES.items()])
    _write_text(os.path.join(root, 'hierarchy.txt'), ['1 0', '295 1', '298 1', '817 1', '1005 0'])
    _check_distinct(out)
    return out


# Butterfly-200: (species folder number, file below the folder, quirk)
BUTTERFLY_IMAGES = (
    (1, '028.jpg', 'rgb'), (1, 'IMG 01.jpg', 'rgb'), (1, '030.jpg', 'rgb'),
    (2, '022.jpg', 'cmyk'), (2, '023.jpg', 'png'), (2, '024.jpg', 'rgb'),
    (150, '134.jpg', 'grey'), (150, 'extra/003.jpg', 'rgb'), (150, '135.jpg', 'truncated'),
    (200, '023.jpg', 'rgb'), (200, '024.jpg', 'rgb'),
)


def butterfly_folder(number: int) -> str:
    return f'{number:03d}.Genus{number}_species{number}'


def write_fake_butterfly(root: str) -> dict:
    """<root>/images_small/ with the 200 species folders 001..200, a few images (the rest empty)
    and a stray non-image file. Returns {path below images_small/: folder number, signature}."""
    images = os.path.join(root, 'images_small')
    for number in range(1, 201):
        os.makedirs(os.path.join(images, butterfly_folder(number)), exist_ok=True)
    _write(os.path.join(images, butterfly_folder(1), 'Thumbs.db'), b'not an image')
    out, greys = {}, 0
    for index, (number, name, kind) in enumerate(BUTTERFLY_IMAGES):
        colour, grey = FIRST['butterfly200']
        data = quirky_image(kind, grey + greys if kind == 'grey' else colour + index, size=(16, 20))
        greys += kind == 'grey'
        rel = f'{butterfly_folder(number)}/{name}'
        _write(os.path.join(images, rel), data)
        out[rel] = {'number': number, 'signature': signature(data)}
    _check_distinct(out)
    return out


CAR_IMAGES = {  # split -> (fname, class 1..196, quirk)
    'train': (('00001.jpg', 1, 'rgb'), ('00002.jpg', 1, 'grey'), ('00003.jpg', 2, 'cmyk'),
              ('00004.jpg', 196, 'png'), ('00005.jpg', 3, 'rgb'), ('00006.jpg', 2, 'rgb')),
    'test': (('00001.jpg', 1, 'rgb'), ('00002.jpg', 2, 'rgb'), ('00003.jpg', 196, 'grey'),
             ('00004.jpg', 3, 'truncated')),
}


def _annotations(rows) -> np.ndarray:
    """A MATLAB struct array like the devkit's: fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname."""
    fields = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class', 'fname')
    table = np.zeros((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for i, (fname, cls) in enumerate(rows):
        values = (np.uint8(1), np.uint8(2), np.uint8(14), np.uint8(15), np.uint8(cls), fname)
        for field, value in zip(fields, values):
            table[0, i][field] = np.array([[value]]) if field != 'fname' else np.array([value])
    return table


def write_fake_cars(root: str, layout: str = 'original', test_labels: bool = True) -> dict:
    """Stanford Cars as the original archives extract ('original': cars_train/00001.jpg,
    devkit/*.mat) or as the mirrored copy ('mirrored': cars_train/cars_train/00001.jpg,
    car_devkit/devkit/*.mat); cars_test_annos_withlabels.mat beside them. Returns
    {'cars_<split>/<fname>': class, signature}."""
    import scipy.io
    devkit = os.path.join(root, 'devkit' if layout == 'original' else 'car_devkit/devkit')
    os.makedirs(devkit, exist_ok=True)
    names = np.array([f'Make{c} Model {c} 20{c % 13:02d}' for c in range(1, 197)], dtype=object)
    scipy.io.savemat(os.path.join(devkit, 'cars_meta.mat'), {'class_names': names[None, :]})
    out, index, greys = {}, 0, 0
    for split, rows in CAR_IMAGES.items():
        folder = os.path.join(root, f'cars_{split}')
        if layout == 'mirrored':
            folder = os.path.join(folder, f'cars_{split}')
        for fname, cls, kind in rows:
            colour, grey = FIRST['stanford_cars']
            data = quirky_image(kind, grey + greys if kind == 'grey' else colour + index, size=(18, 24))
            greys += kind == 'grey'
            index += 1
            _write(os.path.join(folder, fname), data)
            out[f'cars_{split}/{fname}'] = {'class': cls, 'signature': signature(data)}
        table = _annotations([(f, c) for f, c, _ in rows])
        if split == 'train':
            scipy.io.savemat(os.path.join(devkit, 'cars_train_annos.mat'), {'annotations': table})
        else:
            no_class = np.zeros(table.shape, dtype=[(f, 'O') for f in table.dtype.names if f != 'class'])
            for f in no_class.dtype.names:
                no_class[f] = table[f]
            scipy.io.savemat(os.path.join(devkit, 'cars_test_annos.mat'), {'annotations': no_class})
            if test_labels:
                scipy.io.savemat(os.path.join(root, 'cars_test_annos_withlabels.mat'),
                                 {'annotations': table})
    _check_distinct(out)
    return out


def write_mixoe_lists(directory: str, lists: dict) -> None:
    """MixOE's info/<dataset>/ format: {'train': [(path, label)], ...} -> train.txt etc."""
    for split, rows in lists.items():
        _write_text(os.path.join(directory, f'{split}.txt'), [f'{path} {label}' for path, label in rows])
