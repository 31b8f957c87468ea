"""NABirds (Van Horn et al. 2015): 48,562 photos of North American birds, 555 visual categories.

MixOE's ``bird`` benchmark. The TFDS catalog lacks it and the download needs a sign-up, so it is
read from the manual directory, laid out as the official archive extracts (``nabirds/``; a
folder named ``bird/``, MixOE's data/README.md name, or the manual directory itself also work):

    images.txt               "<image id> <path below images/>" per image (the path may hold spaces)
    image_class_labels.txt   "<image id> <class id>"
    train_test_split.txt     "<image id> <1 = train, 0 = test>"
    classes.txt              "<class id> <class name>" (names hold spaces)
    images/<class id, 4 digits>/<file>.jpg

Labels: the class ids that have images (the 555 leaf categories), in increasing id order, numbered
0..554. MixOE's info/bird lists appear to number the classes the same way: on the lines of its
test.txt checked by hand (about 40) the label rises with the class folder (e.g. 0298 -> 3,
0315 -> 7, 0318 -> 10, 0332..0380 -> 24..72 one for one, 1005 -> 549). That is not relied on:
when config.data.image_lists is set, labels are read from the lists, never from here. MixOE's benchmark uses the lists' classes 0..254 only (``range(200 + 55)`` in
its eval.py). ``image/filename`` is the path of images.txt, i.e. relative to images/, exactly as
MixOE's lists write it. hierarchy.txt and the other files of the archive are not needed.

Images keep their original bytes (TensorFlow decodes grey and CMYK JPEGs and PNGs named .jpg);
files TensorFlow cannot read are converted once to PNG, files that do not decode at all are
skipped with a warning. The prepared copy records the annotation files (provenance.py), not the
48,562 images: hashing 9 GB at every open would cost minutes.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from lmoe_jax.data import provenance
from lmoe_jax.data.builders.common import ManualDirBuilder, checked_images, id_pairs
from lmoe_jax.data.files import DataFileError

HOMEPAGE = 'https://dl.allaboutbirds.org/nabirds'
ANNOTATIONS = ('images.txt', 'image_class_labels.txt', 'train_test_split.txt', 'classes.txt')
ROOTS = ('nabirds', 'bird', '.')  # where below the manual directory the files may sit
MANUAL_INSTRUCTIONS = f"""\
Download NABirds (nabirds.tar.gz, about 9 GB, free for non-commercial research after agreeing to
the Cornell Lab's terms) from
  {HOMEPAGE}
and extract it into the manual directory (config.data.manual_dir; TFDS default
~/tensorflow_datasets/downloads/manual/), so that it holds
  nabirds/images.txt, nabirds/image_class_labels.txt, nabirds/train_test_split.txt,
  nabirds/classes.txt and nabirds/images/<class id>/<image>.jpg
(a folder named bird/, as in MixOE's data/README.md, works too).
"""


def find_root(manual: epath.Path) -> epath.Path | None:
    """The first of ``ROOTS`` below ``manual`` that holds images.txt, or None."""
    for name in ROOTS:
        root = manual / name if name != '.' else manual
        if (root / 'images.txt').is_file():
            return root
    return None


def _by_id(path: epath.Path, what: str) -> dict:
    pairs = id_pairs(path, what)
    out = dict(pairs)
    if len(out) != len(pairs):
        raise DataFileError(f'{path} lists an id twice.')
    return out


def read_annotations(root: epath.Path) -> tuple[list[tuple[str, str, int, bool]], list[int], dict]:
    """(image id, path, class id, is train) per image in images.txt order, the labelled class ids
    (sorted) and classes.txt's names by id; every image must have a class and a split."""
    paths = _by_id(root / 'images.txt', 'path below images/')
    classes = _by_id(root / 'image_class_labels.txt', 'class id')
    is_train = _by_id(root / 'train_test_split.txt', '1 or 0')
    names = {int(k): v for k, v in _by_id(root / 'classes.txt', 'class name').items()}
    rows = []
    for image_id, path in paths.items():
        if image_id not in classes or image_id not in is_train:
            raise DataFileError(f'image {image_id} of {root}/images.txt has no class in '
                                'image_class_labels.txt or no split in train_test_split.txt.')
        if is_train[image_id] not in ('0', '1'):
            raise DataFileError(f'train_test_split.txt: image {image_id} has {is_train[image_id]!r}, '
                                'expected 1 (train) or 0 (test).')
        rows.append((image_id, path, int(classes[image_id]), is_train[image_id] == '1'))
    class_ids = sorted({row[2] for row in rows})
    unnamed = [c for c in class_ids if c not in names]
    if unnamed:
        raise DataFileError(f'{root}/classes.txt lacks the classes {unnamed[:5]} that images have.')
    return rows, class_ids, names


class Nabirds(ManualDirBuilder):
    """NABirds, 555 leaf categories, the official train / test split."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Leaf categories by increasing class id; original image bytes.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    FILE_NAME_FEATURE = 'image/filename'

    def source(self) -> provenance.Source:
        root = find_root(self.manual_root)
        if root is None:
            return provenance.Source(provenance.resolved(self.manual_root), None, ANNOTATIONS)
        return provenance.source_in(root, ANNOTATIONS)

    def _info(self):
        return self.dataset_info_from_configs(
            description='NABirds: 555 visual categories of North American birds (MixOE: bird).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'label': tfds.features.ClassLabel(num_classes=555),
                'class_id': tfds.features.Scalar(dtype=np.int32),  # NABirds' own id (classes.txt)
                'image/filename': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage=HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        root = find_root(self.manual_root)
        if root is None:
            raise self.missing(f'no nabirds/images.txt in the manual directory {self.manual_root}.')
        missing = [name for name in ANNOTATIONS if not (root / name).is_file()]
        if not (root / 'images').is_dir():
            missing.append('images/')
        if missing:
            raise self.missing(f'{root} lacks {", ".join(missing)}.')
        rows, class_ids, names = read_annotations(root)
        if len(class_ids) != 555:
            logging.warning('nabirds: %d labelled classes in %s, the release has 555.', len(class_ids), root)
            if len(class_ids) > 555:
                raise DataFileError(f'{root}: {len(class_ids)} labelled classes, more than NABirds\' 555.')
        label = {c: i for i, c in enumerate(class_ids)}
        return {split: self._generate_examples(root / 'images', [r for r in rows if r[3] == train], label)
                for split, train in (('train', True), ('test', False))}

    def _generate_examples(self, image_dir, rows, label):
        skipped = 0
        paths = [image_dir / path for _, path, _, _ in rows]
        for (image_id, path, class_id, _), (full, data) in zip(rows, checked_images(paths)):
            if data is None:
                if not full.exists():
                    raise self.missing(f'{full} is listed in images.txt but missing.')
                skipped += 1
                logging.warning('nabirds: skipping %s, it does not decode', full)
                continue
            yield image_id, {'image': data, 'label': label[class_id], 'class_id': class_id,
                             'image/filename': path}
        if skipped:
            logging.warning('nabirds: skipped %d images that do not decode', skipped)
