"""Class splits of a labelled dataset into in-distribution and fine-grained OOD classes.

The rule is MixOE's (Zhang et al., WACV 2023), so numbers stay comparable with its benchmark:
split ``s`` draws the ID classes with ``np.random.RandomState(s).choice(N, n, replace=False)``
and remaps them to ``0..n-1`` in sorted order.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np


class ClassSplit(NamedTuple):
    """ID and fine-grained OOD class ids of the original dataset, both sorted."""

    id_classes: tuple[int, ...]
    ood_classes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.id_classes) + len(self.ood_classes)

    def label_map(self) -> np.ndarray:
        """Original label -> ID label (0..n-1), or -1 for held-out classes."""
        table = np.full(self.num_classes, -1, dtype=np.int64)
        table[list(self.id_classes)] = np.arange(len(self.id_classes))
        return table


def class_split(
    num_classes: int,
    num_id: int,
    split: int = 0,
    id_classes: Optional[Sequence[int]] = None,
) -> ClassSplit:
    """The MixOE class split ``split`` of ``num_classes`` classes, or an explicit one.

    ``id_classes`` (original class ids) overrides ``split``; it must hold ``num_id`` distinct ids.
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
    chosen = set(ids)
    ood = tuple(c for c in range(num_classes) if c not in chosen)
    return ClassSplit(tuple(ids), ood)
