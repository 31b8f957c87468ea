"""MixOE's image lists: fixed train / val / test images and their labels, read from text files.

``config.data.image_lists=<dir>`` names a folder in MixOE's info/<dataset> format: train.txt,
val.txt (optional here) and test.txt, one ``relative/path label`` per line, the path relative to
the dataset's image folder exactly as the builder's ``image/filename`` feature writes it. A path
may contain a space: MixOE's FinegrainedDataset (utils/dataset.py) then sees three fields and
joins the first two; here the label is the last field and the path everything before it, which
reads those lines the same way.

With lists, each split is exactly the listed images, labelled with the lists' labels (not the
builder's): MixOE's numbering. The class split stays MixOE's rule over ``range(num_classes)``,
so list labels >= num_classes belong to no class of the benchmark and are left out of the ID and
fine-OOD sets (MixOE's ``class_to_id.get(l) is None``), while coarse OOD sets keep every listed
image (MixOE builds them without a class list).
"""
from __future__ import annotations

import hashlib
import re
from typing import Mapping, NamedTuple, Sequence

import tensorflow as tf
from etils import epath

from lmoe_jax.data.files import DataFileError

LIST_FILES = {'train': 'train.txt', 'val': 'val.txt', 'test': 'test.txt'}
REQUIRED = ('train', 'test')
_LINE = re.compile(r'^(?P<path>.*\S)\s+(?P<label>-?\d+)$')


class Selection(NamedTuple):
    """Listed images (relative paths) and their labels, in the list's order."""

    names: tuple
    labels: tuple
    origin: str  # where it was read from, for messages

    @property
    def key(self) -> str:
        """A digest of the content, for caches keyed by selection."""
        digest = hashlib.sha256()
        for name, label in zip(self.names, self.labels):
            digest.update(f'{name}\0{label}\n'.encode())
        return digest.hexdigest()[:16]

    def table(self) -> tf.lookup.StaticHashTable:
        """file name -> list label, -1 for images not listed."""
        return tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(list(self.names), tf.string), tf.constant(list(self.labels), tf.int64)),
            default_value=-1)


def parse_line(line: str, where: str) -> tuple[str, int]:
    """(path, label) of one list line; the label is the last field, the path all before it."""
    match = _LINE.match(line.strip())
    if not match:
        raise DataFileError(f'{where} must read "<relative/path> <label>", got {line.strip()!r}.')
    label = int(match.group('label'))
    if label < 0:
        raise DataFileError(f'{where}: label {label} is negative.')
    return match.group('path'), label


def read_list(path: epath.PathLike) -> Selection:
    """One list file; a path listed twice is refused (a selection by name cannot repeat it)."""
    path = epath.Path(path)
    names, labels, seen = [], [], set()
    for line_no, line in enumerate(path.read_text(encoding='utf-8-sig').splitlines(), 1):
        if not line.strip():
            continue
        name, label = parse_line(line, f'{path}:{line_no}')
        if name in seen:
            raise DataFileError(f'{path}:{line_no} lists {name!r} a second time.')
        seen.add(name)
        names.append(name)
        labels.append(label)
    if not names:
        raise DataFileError(f'{path} lists no image.')
    return Selection(tuple(names), tuple(labels), str(path))


def read_lists(directory: epath.PathLike) -> dict:
    """{'train', 'test'[, 'val']: Selection} of a MixOE info/<dataset> folder."""
    directory = epath.Path(directory)
    missing = [LIST_FILES[s] for s in REQUIRED if not (directory / LIST_FILES[s]).is_file()]
    if missing:
        raise DataFileError(f'config.data.image_lists={directory} lacks {", ".join(missing)} '
                            "(MixOE's info/<dataset>/ folder: train.txt, val.txt, test.txt).")
    return {split: read_list(directory / name) for split, name in LIST_FILES.items()
            if (directory / name).is_file()}


def restrict(selection: Selection, num_classes: int) -> tuple[Selection, int]:
    """The entries with labels < num_classes, and how many were left out."""
    keep = [i for i, label in enumerate(selection.labels) if label < num_classes]
    kept = Selection(tuple(selection.names[i] for i in keep),
                     tuple(selection.labels[i] for i in keep), selection.origin)
    return kept, len(selection.names) - len(keep)


def merged(*selections: Selection) -> Selection:
    """Several disjoint selections as one (e.g. train + val = every training image)."""
    return Selection(sum((s.names for s in selections), ()), sum((s.labels for s in selections), ()),
                     ' + '.join(s.origin for s in selections))


def splits_holding(selection: Selection, split_names: Mapping[str, Sequence]) -> str:
    """The '+'-joined builder splits (in the given order) that hold the listed images.

    ``split_names`` maps each split of the prepared dataset to its file names. An image listed but
    in no split is an error naming the first few: the list does not belong to this download.
    """
    wanted = set(selection.names)
    found, used = set(), []
    for split, names in split_names.items():
        here = wanted.intersection(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        if here:
            used.append(split)
            found |= here
    unknown = [n for n in selection.names if n not in found]
    if unknown:
        raise DataFileError(
            f'{selection.origin} lists {len(unknown)} image(s) the prepared dataset does not hold, '
            f'e.g. {unknown[:5]}: these lists belong to another download or layout (paths are '
            "relative to the dataset's image folder, as the builder's image/filename).")
    return '+'.join(used)


def select(ds: tf.data.Dataset, selection: Selection, feature: str) -> tf.data.Dataset:
    """Keep the listed examples of ``ds`` (read with ``feature``), labelled as the list says."""
    table = selection.table()

    def relabel(example):
        out = {k: v for k, v in example.items() if k != feature}
        out['label'] = table.lookup(example[feature])
        return out

    return ds.map(relabel).filter(_is_listed)


def _is_listed(example) -> tf.Tensor:
    return example['label'] >= 0
