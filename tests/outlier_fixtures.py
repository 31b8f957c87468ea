"""Small fake outlier sources in their real layouts: WebVision 1.0 (resized) and a quirky folder.

Written with plain PIL / text files; what each writer returns (the relative paths of the images
that belong in the dataset) is decided here from the layout, never by the code under test.
"""
import io
import os

import numpy as np
from PIL import Image

# (wnid, names) in the real synsets.txt format. Concepts 2, 4, 5, 6, 7 are in MixOE's excluded
# list (a dog, a bird, a car, a butterfly, an aircraft); 1 and 3 are kept.
SYNSETS = [
    ('n01440764', 'tench, Tinca tinca'),
    ('n02085620', 'Chihuahua'),
    ('n03000134', 'chainlink fence'),
    ('n01514668', 'cock'),
    ('n04285008', 'sports car, sport car'),
    ('n02276258', 'admiral'),
    ('n02690373', 'airliner'),
]
KEPT_CONCEPTS = (1, 3)  # 1-based lines of SYNSETS
# query id -> concept id (1-based), as queries_synsets_map.txt; concept 3 has two queries
QUERIES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 3}


def image_bytes(seed: int, size=(10, 12), fmt='JPEG', mode='RGB') -> bytes:
    rng = np.random.RandomState(seed)
    channels = {'RGB': 3, 'L': 1, 'CMYK': 4}[mode]
    array = rng.randint(0, 256, size=(*size, channels)).astype(np.uint8)
    image = Image.fromarray(array[..., 0] if channels == 1 else array, mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)


def write_fake_webvision(manual_dir: str, per_query: int = 2) -> set:
    """<manual_dir>/WebVision/{info,google,flickr}; returns the relative names ('google/q0001/...')
    of the images MixOE's outlier set keeps (kept concepts' queries, image extensions only)."""
    root = os.path.join(manual_dir, 'WebVision')
    os.makedirs(os.path.join(root, 'info'), exist_ok=True)
    with open(os.path.join(root, 'info', 'synsets.txt'), 'w') as f:
        f.writelines(f'{wnid} {names}\n' for wnid, names in SYNSETS)
    with open(os.path.join(root, 'info', 'queries_synsets_map.txt'), 'w') as f:
        f.writelines(f'{q} {c}\n' for q, c in QUERIES.items())
    kept, seed = set(), 0
    for source in ('google', 'flickr'):
        for query, concept in QUERIES.items():
            if source == 'flickr' and query == 8:
                continue  # a query with Google images only
            for j in range(per_query):
                name = f'{source}/q{query:04d}/{source[0]}{query:04d}_{j:03d}.jpg'
                seed += 1
                _write(os.path.join(root, name), image_bytes(seed))
                if concept in KEPT_CONCEPTS:
                    kept.add(name)
    # a file that is no image (ignored by extension), and a folder of no query of the map
    _write(os.path.join(root, 'google', 'q0001', 'meta.json'), b'{}')
    _write(os.path.join(root, 'google', 'q0999', 'g0999_000.jpg'), image_bytes(999))
    return kept


def write_quirky_tree(root: str) -> set:
    """Nested folders with spaces, a grey JPEG, a CMYK JPEG, a PNG named .jpg, an upper-case
    extension, a TIFF, a non-image and an unreadable .jpg. Returns the names that must be kept."""
    files = {
        'a/b c/photo one.jpg': image_bytes(1),
        'a/grey.jpeg': image_bytes(2, mode='L'),
        'a/b c/d/cmyk.jpg': image_bytes(3, mode='CMYK'),
        'png named.jpg': image_bytes(4, fmt='PNG'),
        'UPPER.JPG': image_bytes(5),
        'scan.tiff': image_bytes(6, fmt='TIFF'),
    }
    for name, data in files.items():
        _write(os.path.join(root, name), data)
    _write(os.path.join(root, 'notes.txt'), b'not an image')
    _write(os.path.join(root, 'a', 'broken.jpg'), b'neither JPEG nor anything else')
    return set(files)


def write_mixoe_lists(info_dir: str, benchmark: str, splits: dict) -> str:
    """MixOE's info/<benchmark>/{train,val,test}.txt: one "relative/path label" per line."""
    folder = os.path.join(info_dir, benchmark)
    os.makedirs(folder, exist_ok=True)
    for split, rows in splits.items():
        with open(os.path.join(folder, f'{split}.txt'), 'w') as f:
            f.writelines(f'{path} {label}\n' for path, label in rows)
    return folder


# Lists for data_fixtures.write_fake_aircraft_archive(train=6, test=4): trainval ids 1000000..5,
# test ids 1000100..3. Label 99 is listed so the lists span MixOE's range(100); test labels 9 and
# 21 are fine-grained OOD in split 0, 0 and 1 are ID.
AIRCRAFT_LISTS = {
    'train': [('1000000.jpg', 0), ('1000001.jpg', 1), ('1000002.jpg', 2), ('1000003.jpg', 99)],
    'val': [('1000004.jpg', 0), ('1000005.jpg', 1)],
    'test': [('1000100.jpg', 9), ('1000101.jpg', 21), ('1000102.jpg', 0), ('1000103.jpg', 1)],
}
