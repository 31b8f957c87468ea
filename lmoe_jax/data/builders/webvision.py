"""WebVision 1.0 as MixOE's auxiliary outliers: every concept except MixOE's excluded synsets.

Read from the resized ("small") Google and Flickr images of WebVision 1.0 and its info files,
placed by hand in the manual directory as ``WebVision/`` (MixOE's data/README.md layout):

    WebVision/info/synsets.txt               1,000 lines "n01440764 tench, Tinca tinca"; line i
                                             (1-based) is concept i
    WebVision/info/queries_synsets_map.txt   lines "<query id> <concept id>" (both 1-based)
    WebVision/google/q0001/*.jpg ...         one folder per query, named 'q' + 4-digit id
    WebVision/flickr/q0001/*.jpg ...

The set is what MixOE's WebVision() helper (utils/dataset.py) builds with ``exclude=True`` and
its ``INET_SPLITS``: the concepts of synsets.txt minus ``MIXOE_EXCLUDED_SYNSETS``, their queries
from queries_synsets_map.txt, and every image file (torchvision's extensions, any depth) in the
folders google/q<id>/ and flickr/q<id>/ of those queries. Labels are the concept's 0-based line
in synsets.txt (its ILSVRC-2012 class index); outliers are used without labels. One split,
'train'; ``config.data.outlier_val_fraction`` holds out a share for model selection (MixOE's
validation mode draws a WebVision subsample of the ID validation size).

Prepared copies are not checked against the folder later (hashing 2 million files at every
open would cost minutes): delete ``<data_dir>/webvision1_outliers`` to rebuild from another copy.
"""
from __future__ import annotations

import re

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from lmoe_jax.data.builders import image_files
from lmoe_jax.data.builders.common import ManualDirBuilder
from lmoe_jax.data.files import DataFileError

# ImageNet synsets MixOE removes from WebVision (dogs, birds, cars, butterflies, aircraft):
# transcribed as data from `INET_SPLITS` in zjysteven/MixOE utils/dataset.py (commit 3ced26e),
# the list its train_*.py and eval.py --val pass to WebVision(..., exclude=True). 223 synsets.
MIXOE_EXCLUDED_SYNSETS = {
    'dog': """
        n02089078 n02102318 n02096294 n02099712 n02112018 n02113023 n02110063 n02099601 n02097658
        n02115641 n02112350 n02106166 n02101556 n02111500 n02106382 n02108422 n02093859 n02098286
        n02107574 n02108551 n02088094 n02097047 n02113799 n02093428 n02085936 n02100735 n02099849
        n02096051 n02089973 n02101006 n02088632 n02093754 n02095314 n02088466 n02086240 n02110185
        n02087046 n02091831 n02105412 n02105641 n02094114 n02107683 n02106550 n02111129 n02113186
        n02100583 n02111889 n02108915 n02102973 n02097298 n02104029 n02090622 n02090379 n02096585
        n02092002 n02087394 n02092339 n02091467 n02110806 n02096177 n02089867 n02099267 n02093647
        n02088364 n02095570 n02085782 n02105056 n02109525 n02115913 n02112706 n02085620 n02095889
        n02101388 n02109961 n02086646 n02102177 n02093256 n02111277 n02098413 n02088238 n02108000
        n02097474 n02113978 n02086079 n02091032 n02106030 n02093991 n02102040 n02113712 n02090721
        n02109047 n02100236 n02102480 n02099429 n02097130 n02108089 n02105505 n02112137 n02094258
        n02110627 n02105162 n02113624 n02106662 n02091635 n02086910 n02098105 n02096437 n02091244
        n02116738 n02104365 n02107908 n02105855 n02091134 n02100877 n02097209 n02094433 n02107142
        n02110958 n02107312 n02105251""".split(),
    'bird': """
        n01514668 n02051845 n02018207 n01531178 n01828970 n01514859 n01558993 n02056570 n02018795
        n01580077 n01847000 n02013706 n01614925 n02028035 n02037110 n02011460 n01855672 n02058221
        n01534433 n01616318 n01855032 n01518878 n01537544 n02002556 n01843383 n01843065 n01622779
        n01860187 n01820546 n01530575 n01819313 n01608432 n02033041 n01818515 n02009912 n02002724
        n01532829 n01560419 n01601694 n02012849 n01582220 n01824575 n01829413 n02027492 n01592084
        n02025239 n02006656 n02007558 n02017213 n01833805 n01817953 n02009229""".split(),
    'car': """
        n04467665 n03895866 n04285008 n02704792 n04465501 n03272562 n03384352 n03345487 n02797295
        n04252077 n03777568 n03791053 n03478589 n03930630 n03977966 n03444034 n03792782 n04335435
        n04204347 n02930766 n03670208 n04252225 n03100240 n03785016 n03417042 n03538406 n04065272
        n04310018 n04461696 n04509417 n03770679 n03594945 n04389033 n03868242 n04482393 n04037443
        n02814533 n03599486 n03393912 n02701002 n03796401 n02835271""".split(),
    'butterfly': 'n02277742 n02281787 n02279972 n02281406 n02280649 n02276258'.split(),
    'aircraft': 'n02690373 n02692877 n02782093'.split(),
}
EXCLUDED = frozenset(w for synsets in MIXOE_EXCLUDED_SYNSETS.values() for w in synsets)

FOLDER = 'WebVision'
SYNSETS = 'info/synsets.txt'
QUERY_MAP = 'info/queries_synsets_map.txt'
SOURCES = ('google', 'flickr')
PAGE = 'https://data.vision.ee.ethz.ch/cvl/webvision/download.html'
MANUAL_INSTRUCTIONS = f"""\
From the WebVision 1.0 download page {PAGE} take the resized (small) Google
and Flickr images and the "Training & Validation Labels" (the info/ folder), extract them and
place them in the manual directory (config.data.manual_dir; TFDS default
~/tensorflow_datasets/downloads/manual/) as {FOLDER}/ (MixOE's data/README.md layout):
{FOLDER}/{SYNSETS}, {FOLDER}/{QUERY_MAP}, {FOLDER}/google/q0001/*.jpg ... and
{FOLDER}/flickr/q0001/*.jpg ... (one folder per query).
"""
_WNID = re.compile(r'n\d{8}')


def read_synsets(path: epath.PathLike) -> list[str]:
    """The concepts' WordNet ids in file order (concept id = position + 1)."""
    wnids = []
    lines = epath.Path(path).read_text(encoding='utf-8').splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for line_no, line in enumerate(lines, 1):
        wnid = line[:9]
        if not _WNID.fullmatch(wnid) or line[9:10] not in ('', ' '):
            raise DataFileError(f'{path}:{line_no} must read "<wnid> <names>" (e.g. '
                                f'"n01440764 tench, Tinca tinca"), got {line!r}.')
        wnids.append(wnid)
    if len(set(wnids)) != len(wnids):
        raise DataFileError(f'{path} lists a synset twice.')
    return wnids


def read_query_map(path: epath.PathLike, num_concepts: int) -> dict[int, list[int]]:
    """Concept id (1-based) -> its query ids, from lines "<query id> <concept id>"."""
    queries: dict[int, list[int]] = {}
    for line_no, line in enumerate(epath.Path(path).read_text(encoding='utf-8').splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not all(f.isdigit() for f in fields):
            raise DataFileError(f'{path}:{line_no} must read "<query id> <concept id>", got {line!r}.')
        query, concept = int(fields[0]), int(fields[1])
        if not 1 <= concept <= num_concepts:
            raise DataFileError(f'{path}:{line_no}: concept {concept} is not in 1..{num_concepts} '
                                '(the lines of synsets.txt).')
        queries.setdefault(concept, []).append(query)
    return queries


def kept_queries(wnids: list[str], queries: dict[int, list[int]],
                 excluded=EXCLUDED) -> list[tuple[str, int, str]]:
    """(query folder 'q0001', 0-based concept index, wnid) of every query of a kept concept."""
    kept = []
    for index, wnid in enumerate(wnids):
        if wnid in excluded:
            continue
        kept.extend((f'q{q:04d}', index, wnid) for q in queries.get(index + 1, ()))
    return kept


class Webvision1Outliers(ManualDirBuilder):
    """WebVision 1.0 (resized) without MixOE's excluded concepts: MixOE's auxiliary outliers."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': "MixOE's WebVision outliers: 223 synsets excluded, original bytes."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS
    TEST_SPLIT = 'train'  # one split (usable as a coarse OOD set too)
    FILE_NAME_FEATURE = 'image/filename'

    def _info(self):
        return self.dataset_info_from_configs(
            description=__doc__.split('\n\n')[0],
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(num_classes=1000),
                'synset': tfds.features.Text(),
                'image/filename': tfds.features.Text(),  # e.g. google/q0001/000001.jpg
            }),
            supervised_keys=('image', 'label'),
            homepage='https://data.vision.ee.ethz.ch/cvl/webvision/dataset2017.html',
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the images come from the manual directory
        root = self.manual_root / FOLDER
        for name in (SYNSETS, QUERY_MAP):
            if not (root / name).is_file():
                raise self.missing(f'{root / name} is missing.')
        wnids = read_synsets(root / SYNSETS)
        queries = kept_queries(wnids, read_query_map(root / QUERY_MAP, len(wnids)))
        folders = [source for source in SOURCES if (root / source).is_dir()]
        if not folders:
            raise self.missing(f'neither {root}/google/ nor {root}/flickr/ exists.')
        return {'train': self._generate_examples(root, folders, queries)}

    def _generate_examples(self, root, folders, queries):
        files = []
        for source in folders:
            for query, index, wnid in queries:
                folder = root / source / query
                if folder.is_dir():
                    files.extend((f'{source}/{query}/{rel}', path, index, wnid)
                                 for rel, path in image_files.image_paths(folder))
        if not files:
            raise self.missing(f'no image of a kept concept under {root}/google/ or flickr/.')
        skipped = 0
        loaded = image_files.read_images(path for _, path, _, _ in files)  # in order
        for (name, path, index, wnid), (_, data) in zip(files, loaded):
            if data is None:
                skipped += 1
                logging.warning('webvision1_outliers: skipping unreadable image %s', path)
                continue
            yield name, {'image': data, 'label': index, 'synset': wnid, 'image/filename': name}
        if skipped:
            logging.warning('webvision1_outliers: skipped %d unreadable files', skipped)
