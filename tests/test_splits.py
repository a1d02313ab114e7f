"""Train / validation splits: stable hash placement, minimum counts, the held-out view."""
from __future__ import annotations

import pytest

from mar3d.data.splits import assign_split, resolve_holdout_view, shape_family, split_score


def _uids(n: int) -> list[str]:
    return [f"{i:016x}-object_{i:03d}-textured" for i in range(n)]


def test_split_is_stable_when_objects_are_added():
    small = assign_split(_uids(200), val_fraction=0.1, min_val_objects=4, num_views=8)
    large = assign_split(_uids(400), val_fraction=0.1, min_val_objects=4, num_views=8)
    assert small.val <= large.val and small.train <= large.train
    assert 10 <= len(small.val) <= 30 and not small.val & small.train
    assert small.val == {u for u in _uids(200) if split_score(u) < 0.1}


def test_split_minimum_and_cap():
    few = assign_split(_uids(20), val_fraction=0.1, min_val_objects=4, num_views=8)
    assert len(few.val) == 4 and len(few.train) == 16
    ranked = sorted(_uids(20), key=split_score)
    assert few.val == set(ranked[:4])  # the lowest hashes are pulled in
    tiny = assign_split(_uids(4), val_fraction=0.1, min_val_objects=4, num_views=2)
    assert len(tiny.val) == 2 and len(tiny.train) == 2  # never more than half
    assert assign_split(_uids(9), 0.0, 0, num_views=2).val == frozenset()


def test_holdout_view():
    split = assign_split(_uids(10), num_views=8)
    assert split.holdout_view == 7 and split.training_views() == list(range(7))
    assert split.evaluation_view() == 7
    assert assign_split(_uids(10), holdout_view=None, num_views=8).training_views() == list(range(8))
    assert resolve_holdout_view(0, 2) == 0 and resolve_holdout_view(-2, 4) == 2
    with pytest.raises(ValueError, match="at least 2"):
        resolve_holdout_view(-1, 1)
    with pytest.raises(ValueError, match="outside"):
        resolve_holdout_view(8, 8)


def test_shape_families_group_ycb_variants():
    assert shape_family("0123456789abcdef-065-a_cups-textured") == "065"
    assert shape_family("0123456789abcdef-065-j_cups-textured") == "065"
    assert shape_family("0123456789abcdef-072-c_toy_airplane-textured") == "072"
    plain = "0123456789abcdef-025_mug-textured"
    assert shape_family(plain) == plain
