"""Stanford Cars (Krause et al. 2013): 16,185 photos of 196 car models, MixOE's ``car``.

Read by hand from the manual directory, because TFDS's ``cars196`` download has returned HTTP 404
since 2023 (tensorflow/datasets issues #5053 and #5656). Two layouts of the same files are
accepted, in ``stanford_cars/``, ``car/`` (MixOE's data/README.md name) or the manual directory
itself:

    original archives                       commonly mirrored copy
    cars_train/00001.jpg ...                cars_train/cars_train/00001.jpg ...
    cars_test/00001.jpg ...                 cars_test/cars_test/00001.jpg ...
    devkit/cars_meta.mat                    car_devkit/devkit/cars_meta.mat (or devkit/)
    devkit/cars_train_annos.mat             car_devkit/devkit/cars_train_annos.mat
    cars_test_annos_withlabels.mat          cars_test_annos_withlabels.mat

(the .mat files are looked up in the folder itself, devkit/ and car_devkit/devkit/). The devkit's
struct arrays ``annotations`` (fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname) give each
image's class, 1..196; cars_meta.mat's ``class_names`` names them. Labels are ``class - 1``
(0..195), the numbering of MixOE's info/car lists (which hold label 0). ``image/filename`` is
``cars_train/<fname>`` or ``cars_test/<fname>`` in both layouts, as MixOE's lists write it
(relative to its car/ folder). Train / test are the official splits (8,144 / 8,041).

Images keep their original bytes (TensorFlow decodes grey and CMYK JPEGs), others are converted
once to PNG, images that do not decode are skipped with a warning. The prepared copy records the
three .mat files (provenance.py), not the images.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from lmoe_jax.data import provenance
from lmoe_jax.data.builders.common import ManualDirBuilder, checked_images
from lmoe_jax.data.files import DataFileError

HOMEPAGE = 'https://ai.stanford.edu/~jkrause/cars/car_dataset.html'
NUM_CLASSES = 196
ROOTS = ('stanford_cars', 'car', '.')
ANNOTATION_DIRS = ('.', 'devkit', 'car_devkit/devkit')
META = 'cars_meta.mat'
SPLIT_ANNOTATIONS = {'train': 'cars_train_annos.mat', 'test': 'cars_test_annos_withlabels.mat'}
MANUAL_INSTRUCTIONS = f"""\
Stanford Cars' page ({HOMEPAGE}) and its archive links return HTTP
404 since 2023 (tensorflow/datasets issues #5053, #5656; TFDS's cars196 fails the same way).
Get the same files from a copy: the original archives cars_train.tgz, cars_test.tgz,
car_devkit.tgz and cars_test_annos_withlabels.mat (e.g. from the Internet Archive's snapshots of
that page), or a mirrored copy of the dataset (e.g. on Kaggle) that holds
cars_train/cars_train/*.jpg, cars_test/cars_test/*.jpg and the devkit's .mat files.
Place them in the manual directory (config.data.manual_dir; TFDS default
~/tensorflow_datasets/downloads/manual/) under stanford_cars/ (or car/):
  stanford_cars/cars_train/00001.jpg ...     (or stanford_cars/cars_train/cars_train/00001.jpg)
  stanford_cars/cars_test/00001.jpg ...      (or stanford_cars/cars_test/cars_test/00001.jpg)
  stanford_cars/devkit/cars_meta.mat, stanford_cars/devkit/cars_train_annos.mat
  stanford_cars/cars_test_annos_withlabels.mat
(.mat files may also sit in stanford_cars/ itself or stanford_cars/car_devkit/devkit/).
"""


def find_root(manual: epath.Path) -> epath.Path | None:
    """The first of ``ROOTS`` below ``manual`` that has a cars_train/ folder, or None."""
    for name in ROOTS:
        root = manual / name if name != '.' else manual
        if (root / 'cars_train').is_dir():
            return root
    return None


def find_annotation(root: epath.Path, name: str) -> epath.Path | None:
    for folder in ANNOTATION_DIRS:
        path = root / name if folder == '.' else root / folder / name
        if path.is_file():
            return path
    return None


def image_dir(root: epath.Path, split: str) -> epath.Path:
    """cars_<split>/, or cars_<split>/cars_<split>/ when the copy nests the images one deeper."""
    outer = root / f'cars_{split}'
    inner = outer / f'cars_{split}'
    return inner if inner.is_dir() else outer


def _loadmat(path: epath.Path) -> dict:
    import scipy.io  # scipy reads MATLAB v5 files; it comes with scikit-learn
    with epath.Path(path).open('rb') as f:
        return scipy.io.loadmat(f, squeeze_me=True)


def read_annotations(path: epath.Path) -> list[tuple[str, int]]:
    """(fname, class 1..196) of each entry of a devkit ``annotations`` struct array."""
    table = _loadmat(path).get('annotations')
    if table is None or table.dtype.names is None or not {'fname', 'class'} <= set(table.dtype.names):
        raise DataFileError(f'{path} has no struct array "annotations" with fields fname and class '
                            '(cars_test_annos.mat without labels is not enough: use '
                            'cars_test_annos_withlabels.mat).')
    rows = []
    for entry in np.atleast_1d(table):
        name, cls = str(entry['fname']).strip(), int(entry['class'])
        if not 1 <= cls <= NUM_CLASSES:
            raise DataFileError(f'{path}: {name} has class {cls}, outside 1..{NUM_CLASSES}.')
        rows.append((name, cls))
    return rows


def read_class_names(path: epath.Path) -> list[str]:
    names = [str(n) for n in np.atleast_1d(_loadmat(path).get('class_names', []))]
    if len(names) != NUM_CLASSES:
        raise DataFileError(f'{path} must name {NUM_CLASSES} classes in class_names, found {len(names)}.')
    return names


class StanfordCars(ManualDirBuilder):
    """Stanford Cars, 196 models, official train / test, from the devkit's annotations."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Read by hand (devkit .mat files); label = class - 1.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    FILE_NAME_FEATURE = 'image/filename'

    def _annotation_paths(self, root: epath.Path) -> dict:
        names = {'meta': META, **SPLIT_ANNOTATIONS}
        return {key: find_annotation(root, name) for key, name in names.items()}

    def source(self) -> provenance.Source:
        root = find_root(self.manual_root)
        paths = self._annotation_paths(root) if root is not None else {}
        if root is None or None in paths.values():
            names = (META, *SPLIT_ANNOTATIONS.values())
            return provenance.Source(provenance.resolved(self.manual_root), None, names)
        return provenance.Source(provenance.resolved(root),
                                 {str(p.relative_to(root)): p for p in paths.values()})

    def _info(self):
        return self.dataset_info_from_configs(
            description='Stanford Cars, 196 models (MixOE: car, 150 ID / 46 OOD).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                'class_name': tfds.features.Text(),
                'image/filename': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage=HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        root = find_root(self.manual_root)
        if root is None:
            raise self.missing(f'no stanford_cars/cars_train/ in the manual directory {self.manual_root}.')
        paths = self._annotation_paths(root)
        missing = [name for key, name in (('meta', META), *SPLIT_ANNOTATIONS.items())
                   if paths[key] is None]
        missing += [f'cars_{s}/' for s in SPLIT_ANNOTATIONS if not image_dir(root, s).is_dir()]
        if missing:
            raise self.missing(f'{root} lacks {", ".join(missing)}.')
        names = read_class_names(paths['meta'])
        rows = {split: read_annotations(paths[split]) for split in SPLIT_ANNOTATIONS}
        return {split: self._generate_examples(split, image_dir(root, split), rows[split], names)
                for split in SPLIT_ANNOTATIONS}

    def _generate_examples(self, split, folder, rows, names):
        skipped = 0
        paths = [folder / name for name, _ in rows]
        for (name, cls), (path, data) in zip(rows, checked_images(paths)):
            if data is None:
                if not path.exists():
                    raise self.missing(f'{path} is in the annotations but missing.')
                skipped += 1
                logging.warning('stanford_cars: skipping %s, it does not decode', path)
                continue
            file_name = f'cars_{split}/{name}'
            yield file_name, {'image': data, 'label': cls - 1, 'class_name': names[cls - 1],
                              'image/filename': file_name}
        if skipped:
            logging.warning('stanford_cars: skipped %d images that do not decode', skipped)
