"""Butterfly-200 (Chen et al. 2018): photos of 200 butterfly species, MixOE's ``butterfly``.

Read from the manual directory in the layout MixOE's data/README.md uses (its images_small/
folder of the release, the resized images):

    butterfly200/images_small/001.Atrophaneura_horishanus/028.jpg
    butterfly200/images_small/<NNN>.<Genus_species>/<file> ...   (200 folders, NNN = 001..200)

(a folder named ``butterfly/``, MixOE's name, or images_small/ directly in the manual directory
also work). Every file with an image extension (torchvision's list, any case) below a species
folder is read, at any depth.

One split, 'images' (every image): the download's own split files are not part of MixOE's
layout, so the splits come from MixOE's info/butterfly lists (config.data.image_lists); the
pipeline refuses this dataset without them. Labels here are 0-based, folder NNN -> label NNN - 1. MixOE's lists write
the folder number itself (``001.Atrophaneura_horishanus/028.jpg 1``) and MixOE's code uses that
number unchanged: eval.py draws the ID classes from ``range(200)`` = 0..199, and
FinegrainedDataset keeps an image only when its list label is one of the drawn classes. So in
MixOE's benchmark class 0 has no image (when drawn as ID it is an output never trained) and folder
200 (Hasora vitta) is never used as ID or fine OOD; it does appear in the coarse OOD sets of the
other benchmarks (their ``FinegrainedDataset`` without a class list keeps every label). With
image_lists the pipeline reproduces exactly that, reading the labels from the lists.
``image/filename`` is the path below images_small/, as the lists write it.

Images keep their original bytes when TensorFlow decodes them (PNGs named .jpg, grey and CMYK
JPEGs), others are converted once to PNG, undecodable files are skipped with a warning. The
prepared copy is not checked against the folder later (no annotation file to fingerprint):
delete ``<data_dir>/butterfly200`` to rebuild from another copy.
"""
from __future__ import annotations

import re

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from lmoe_jax.data.builders import image_files
from lmoe_jax.data.builders.common import ManualDirBuilder, checked_images
from lmoe_jax.data.files import DataFileError

HOMEPAGE = 'https://www.dropbox.com/sh/3p4x1oc5efknd69/AABwnyoH2EKi6H9Emcyd0pXCa?dl=0'
NUM_CLASSES = 200
ROOTS = ('butterfly200', 'butterfly', '.')
FOLDER = re.compile(r'^(\d{3})\.(\S.*)$')  # 001.Atrophaneura_horishanus
MANUAL_INSTRUCTIONS = f"""\
Download Butterfly-200 (the folder shared by its authors, linked from MixOE's data/README.md):
  {HOMEPAGE}
and place its images_small/ folder into the manual directory (config.data.manual_dir; TFDS
default ~/tensorflow_datasets/downloads/manual/) as
  butterfly200/images_small/<NNN>.<Genus_species>/<image>.jpg   (200 species folders, 001..200)
(butterfly/images_small/, MixOE's name, works too). Its splits come from MixOE's info/butterfly
lists: set config.data.image_lists to that folder of a clone of github.com/zjysteven/MixOE.
"""


def find_images_dir(manual: epath.Path) -> epath.Path | None:
    """images_small/ below the first of ``ROOTS`` that has one, or None."""
    for name in ROOTS:
        folder = (manual / name if name != '.' else manual) / 'images_small'
        if folder.is_dir():
            return folder
    return None


def species_folders(images_dir: epath.Path) -> dict[str, int]:
    """Species folder name -> 0-based label (NNN - 1); the 200 folders 001..200 must be there."""
    folders = {}
    for entry in images_dir.iterdir():
        match = FOLDER.match(entry.name)
        if entry.is_dir() and match:
            folders[entry.name] = int(match.group(1)) - 1
    labels = sorted(folders.values())
    if labels != list(range(NUM_CLASSES)):
        missing = sorted(set(range(NUM_CLASSES)) - set(labels))
        raise DataFileError(
            f'{images_dir} must hold the 200 species folders 001.<name> .. 200.<name> once each; '
            f'found {len(labels)} (missing numbers: {[n + 1 for n in missing[:5]]}'
            f'{", ..." if len(missing) > 5 else ""}).')
    return folders


class Butterfly200(ManualDirBuilder):
    """Butterfly-200 at the species level; one split 'images' (splits come from MixOE's lists)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'images_small/, species folder NNN -> label NNN - 1, one split.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    FILE_NAME_FEATURE = 'image/filename'
    TRAIN_SPLIT = TEST_SPLIT = 'images'  # TFDS reserves 'all'
    NEEDS_IMAGE_LISTS = True

    def _info(self):
        return self.dataset_info_from_configs(
            description='Butterfly-200 species level (MixOE: butterfly, 150 ID / 50 OOD).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3)),
                'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                'image/filename': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage=HOMEPAGE,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        images_dir = find_images_dir(self.manual_root)
        if images_dir is None:
            raise self.missing(f'no butterfly200/images_small/ in the manual directory {self.manual_root}.')
        folders = species_folders(images_dir)
        found = [(rel, path) for rel, path in image_files.image_paths(images_dir)
                 if rel.split('/', 1)[0] in folders]
        if not found:
            raise self.missing(f'{images_dir} has species folders but no image in them.')
        return {'images': self._generate_examples(found, folders)}

    def _generate_examples(self, found, folders):
        skipped = 0
        for (rel, path), (_, data) in zip(found, checked_images([p for _, p in found])):
            if data is None:
                skipped += 1
                logging.warning('butterfly200: skipping %s, it does not decode', path)
                continue
            yield rel, {'image': data, 'label': folders[rel.split('/', 1)[0]], 'image/filename': rel}
        if skipped:
            logging.warning('butterfly200: skipped %d images that do not decode', skipped)
