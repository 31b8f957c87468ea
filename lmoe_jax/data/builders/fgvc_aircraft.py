"""FGVC-Aircraft 2013b (Maji et al. 2013): 100 aircraft variants, 6,667 trainval / 3,333 test.

The TFDS catalog lacks it. The official archive is downloaded by URL, or read from the manual
directory when placed there by hand (the archive itself or its extracted folder). Labels are the
100 variants in the order of ``variants.txt``; train = the official ``trainval`` list. Images are
stored as the original JPEG bytes (the 20 px copyright banner at the bottom is kept, as in the
MixOE benchmark code, which does not crop it).
"""
from __future__ import annotations

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from lmoe_jax.data import provenance
from lmoe_jax.data.builders.common import ManualDirBuilder, can_reach, files_under
from lmoe_jax.data.files import DataFileError

URL = 'https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz'
ARCHIVE = 'fgvc-aircraft-2013b.tar.gz'
FOLDER = 'fgvc-aircraft-2013b'
SPLIT_FILES = {'train': 'images_variant_trainval.txt', 'test': 'images_variant_test.txt'}
MANUAL_INSTRUCTIONS = f"""\
Download the official archive {ARCHIVE} (2.6 GiB) from
  {URL}
(page: https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/) and put it, or the folder
{FOLDER}/ it extracts to, into the manual directory (config.data.manual_dir; TFDS default
~/tensorflow_datasets/downloads/manual/). Expected inside: {FOLDER}/data/variants.txt,
{FOLDER}/data/images_variant_trainval.txt, {FOLDER}/data/images_variant_test.txt and
{FOLDER}/data/images/<id>.jpg.
"""


def read_variant_list(path: epath.PathLike) -> list[tuple[str, str]]:
    """(image id, variant) pairs of an ``images_variant_*.txt`` file (variants may hold spaces)."""
    pairs = []
    for line_no, line in enumerate(epath.Path(path).read_text(encoding='utf-8').splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        image_id, sep, variant = line.partition(' ')
        if not sep or not variant.strip():
            raise DataFileError(f'{path}:{line_no} must read "<image id> <variant>", got {line!r}.')
        pairs.append((image_id, variant.strip()))
    return pairs


def is_readable_image(path: epath.PathLike) -> bool:
    """Whether PIL can fully decode ``path`` (a truncated or corrupt JPEG is not)."""
    try:
        with epath.Path(path).open('rb') as f, Image.open(f) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


class FgvcAircraft(ManualDirBuilder):
    """FGVC-Aircraft 2013b at the variant level (100 classes)."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'Variant level, trainval/test, original JPEG bytes.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    FILE_NAME_FEATURE = 'image/filename'

    def source(self) -> provenance.Source:
        """The archive (or its extracted folder) in the manual directory; else the URL, unchecked."""
        root = self.manual_root
        if (root / ARCHIVE).is_file():
            return provenance.source_in(root, (ARCHIVE,))
        data = root / FOLDER / 'data'
        if data.is_dir():
            files = {f'{FOLDER}/data/{name}': path for name, path in files_under(data).items()}
            return provenance.Source(provenance.resolved(root), files)
        return provenance.Source(URL, None, (ARCHIVE,))

    def _info(self):
        return self.dataset_info_from_configs(
            description='FGVC-Aircraft 2013b, 100 variants (MixOE benchmark: 90 ID / 10 OOD).',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(num_classes=100),
                'variant': tfds.features.Text(),
                'image/filename': tfds.features.Text(),
            }),
            supervised_keys=('image', 'label'),
            homepage='https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/',
        )

    def _split_generators(self, dl_manager):
        data_dir = self._locate_root(dl_manager) / FOLDER / 'data'
        variants_path = data_dir / 'variants.txt'
        if not variants_path.exists():
            raise FileNotFoundError(
                f'fgvc_aircraft: {variants_path} is missing; the archive is incomplete.\n'
                + MANUAL_INSTRUCTIONS)
        variants = [v.strip() for v in variants_path.read_text(encoding='utf-8').splitlines()
                    if v.strip()]
        if len(variants) != 100 or len(set(variants)) != 100:
            raise DataFileError(f'{variants_path} must list 100 distinct variants, found {len(variants)}.')
        index = {v: i for i, v in enumerate(variants)}
        splits = {}
        for split, list_name in SPLIT_FILES.items():
            list_path = data_dir / list_name
            if not list_path.exists():
                raise FileNotFoundError(f'fgvc_aircraft: {list_path} is missing.\n' + MANUAL_INSTRUCTIONS)
            pairs = read_variant_list(list_path)
            unknown = sorted({v for _, v in pairs if v not in index})
            if unknown:
                raise DataFileError(f'{list_path} names variants not in variants.txt: {unknown[:5]}.')
            splits[split] = (pairs, data_dir / 'images')
        return {split: self._generate_examples(pairs, image_dir, index)
                for split, (pairs, image_dir) in splits.items()}

    def _locate_root(self, dl_manager) -> epath.Path:
        """Folder that holds ``fgvc-aircraft-2013b/``: manual dir first, else download by URL."""
        manual = self.manual_root
        if (manual / FOLDER).is_dir():
            return manual
        if (manual / ARCHIVE).exists():
            return epath.Path(dl_manager.extract(manual / ARCHIVE))
        if not self.allow_download:
            raise FileNotFoundError(
                f'fgvc_aircraft: no {ARCHIVE} or {FOLDER}/ in the manual directory {manual} and '
                'downloading is off (config.data.download=False).\n' + MANUAL_INSTRUCTIONS)
        if not can_reach('www.robots.ox.ac.uk'):
            raise FileNotFoundError(
                f'fgvc_aircraft: no {ARCHIVE} or {FOLDER}/ in the manual directory {manual} and no '
                'network to download it.\n' + MANUAL_INSTRUCTIONS)
        try:
            return epath.Path(dl_manager.download_and_extract(URL))
        except Exception as e:  # noqa: BLE001 - any download failure gets the manual route
            raise FileNotFoundError(
                f'fgvc_aircraft is not prepared and could not be downloaded ({type(e).__name__}: '
                f'{e}).\n' + MANUAL_INSTRUCTIONS) from e

    def _generate_examples(self, pairs, image_dir, index):
        skipped = 0
        for image_id, variant in pairs:
            path = image_dir / f'{image_id}.jpg'
            if not path.exists():
                raise FileNotFoundError(
                    f'fgvc_aircraft: {path} is listed but missing; the archive is incomplete.\n'
                    + MANUAL_INSTRUCTIONS)
            if not is_readable_image(path):
                skipped += 1
                logging.warning('fgvc_aircraft: skipping corrupt image %s', path)
                continue
            yield image_id, {'image': str(path), 'label': index[variant], 'variant': variant,
                             'image/filename': f'{image_id}.jpg'}
        if skipped:
            logging.warning('fgvc_aircraft: skipped %d corrupt images in %s', skipped, image_dir)
