"""Class splits: MixOE's published check value and explicit lists."""
import numpy as np
import pytest

from lmoe_jax.data import class_split


def test_mixoe_check_value_aircraft_split0():
    # REFERENCES.md: N=100, n=90, split 0 leaves these OOD classes (from the MixOE protocol).
    split = class_split(100, 90, split=0)
    assert split.ood_classes == (9, 21, 36, 44, 47, 64, 67, 83, 87, 96)
    assert len(split.id_classes) == 90


@pytest.mark.parametrize('n_classes,n_id,s', [(200, 150, 0), (200, 150, 1), (196, 150, 2), (10, 6, 0)])
def test_splits_are_disjoint_complete_and_sorted(n_classes, n_id, s):
    split = class_split(n_classes, n_id, split=s)
    assert set(split.id_classes).isdisjoint(split.ood_classes)
    assert set(split.id_classes) | set(split.ood_classes) == set(range(n_classes))
    assert list(split.id_classes) == sorted(split.id_classes)
    assert len(split.id_classes) == n_id


def test_different_splits_differ():
    assert class_split(200, 150, 0).id_classes != class_split(200, 150, 1).id_classes


def test_label_map_remaps_id_classes_in_sorted_order():
    split = class_split(10, 6, id_classes=[9, 0, 8, 1, 2, 3])
    assert split.id_classes == (0, 1, 2, 3, 8, 9)
    assert split.ood_classes == (4, 5, 6, 7)
    np.testing.assert_array_equal(split.label_map(), [0, 1, 2, 3, -1, -1, -1, -1, 4, 5])


@pytest.mark.parametrize('kwargs,match', [
    (dict(num_classes=10, num_id=11), 'num_id_classes=11'),
    (dict(num_classes=10, num_id=3, id_classes=[0, 1, 10]), 'outside 0..9'),
    (dict(num_classes=10, num_id=3, id_classes=[0, 1, 1]), 'twice'),
    (dict(num_classes=10, num_id=4, id_classes=[0, 1, 2]), 'lists 3 classes'),
    (dict(num_classes=10, num_id=4, split=-1), 'split=-1'),
])
def test_bad_splits_say_what_to_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        class_split(**kwargs)


def test_ignored_classes_leave_the_ood_side_and_map_apart():
    # leave-classes-out: ID {0,1,2,3}, OOD the held-out ID classes {8, 9}, the test's OOD ignored
    split = class_split(10, 4, id_classes=[3, 2, 1, 0], ignore_classes=[7, 4, 6, 5])
    assert split == ((0, 1, 2, 3), (8, 9), (4, 5, 6, 7)) and split.num_classes == 10
    np.testing.assert_array_equal(split.label_map(), [0, 1, 2, 3, -2, -2, -2, -2, -1, -1])
    assert class_split(10, 6, split=0).ignored_classes == ()


@pytest.mark.parametrize('ignore,match', [([0, 4], r'ID classes \[0\]'), ([10], 'outside 0..9'),
                                          ([4, 5, 6, 7, 8, 9], 'no fine-grained OOD class')])
def test_bad_ignored_classes_say_what_to_fix(ignore, match):
    with pytest.raises(ValueError, match=match):
        class_split(10, 4, id_classes=[0, 1, 2, 3], ignore_classes=ignore)
