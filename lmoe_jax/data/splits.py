"""Class splits of a labelled dataset into in-distribution and fine-grained OOD classes.

The rule is MixOE's (Zhang et al., WACV 2023), so numbers stay comparable with its benchmark:
split ``s`` draws the ID classes with ``np.random.RandomState(s).choice(N, n, replace=False)``
and remaps them to ``0..n-1`` in sorted order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np


#: label_map's value for a class that is fine-grained OOD, and for one the run leaves out entirely
OOD_LABEL, IGNORED_LABEL = -1, -2


class ClassSplit(NamedTuple):
    """ID, fine-grained OOD and ignored class ids of the original dataset, each sorted.

    Ignored classes are in no set at all (neither trained on nor scored): a leave-classes-out
    selection run holds some ID classes out as pseudo-OOD and must not see the test's OOD classes.
    """

    id_classes: tuple[int, ...]
    ood_classes: tuple[int, ...]
    ignored_classes: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.id_classes) + len(self.ood_classes) + len(self.ignored_classes)

    def label_map(self) -> np.ndarray:
        """Original label -> ID label (0..n-1), OOD_LABEL (-1) for the fine-grained OOD classes,
        IGNORED_LABEL (-2) for ignored ones: ``>= 0`` is ID, ``== OOD_LABEL`` is OOD."""
        table = np.full(self.num_classes, OOD_LABEL, dtype=np.int64)
        table[list(self.id_classes)] = np.arange(len(self.id_classes))
        table[list(self.ignored_classes)] = IGNORED_LABEL
        return table


def class_split(
    num_classes: int,
    num_id: int,
    split: int = 0,
    id_classes: Optional[Sequence[int]] = None,
    ignore_classes: Optional[Sequence[int]] = None,
) -> ClassSplit:
    """The MixOE class split ``split`` of ``num_classes`` classes, or an explicit one.

    ``id_classes`` (original class ids) overrides ``split``; it must hold ``num_id`` distinct ids.
    ``ignore_classes`` are taken out of the OOD classes (they may not be ID classes).
    """
    num_classes, num_id = int(num_classes), int(num_id)
    if not 0 < num_id <= num_classes:
        raise ValueError(
            f'num_id_classes={num_id} must be between 1 and num_classes={num_classes}; '
            'fix config.data.num_id_classes / config.data.num_classes.')
    if id_classes is not None:
        ids = sorted(int(c) for c in id_classes)
        bad = [c for c in ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(
                f'config.data.id_classes holds {bad}, outside 0..{num_classes - 1}; '
                'list class ids of the original dataset.')
        if len(set(ids)) != len(ids):
            raise ValueError('config.data.id_classes lists a class twice; list each ID class once.')
        if len(ids) != num_id:
            raise ValueError(
                f'config.data.id_classes lists {len(ids)} classes but '
                f'config.data.num_id_classes={num_id}; make them agree.')
    else:
        if int(split) < 0:
            raise ValueError(f'config.data.split={split} must be >= 0 (0, 1, 2 are the standard splits).')
        ids = sorted(int(c) for c in np.random.RandomState(int(split)).choice(
            num_classes, num_id, replace=False))
    ignored = sorted({int(c) for c in (ignore_classes or ())})
    bad = [c for c in ignored if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f'config.data.ignore_classes holds {bad}, outside 0..{num_classes - 1}; '
                         'list class ids of the original dataset.')
    both = sorted(set(ignored) & set(ids))
    if both:
        raise ValueError(f'config.data.ignore_classes holds ID classes {both}; a class is ID or '
                         'ignored, not both.')
    chosen = set(ids) | set(ignored)
    ood = tuple(c for c in range(num_classes) if c not in chosen)
    if ignored and not ood:
        raise ValueError('no fine-grained OOD class is left: every class is ID or in '
                         'config.data.ignore_classes.')
    return ClassSplit(tuple(ids), ood, tuple(ignored))
