"""Train / validation splits of a prepared dataset: held-out objects and a held-out view.

Every object is placed by a stable hash of its uid, so adding objects to a dataset never
moves an existing one across the split (unless the minimum count below has to pull one
in):

* ``u(uid)`` = first 8 bytes of sha256(``split_salt`` + uid) as a number in [0, 1).
  Objects with ``u < split_val_fraction`` are validation objects; if that gives fewer
  than ``split_min_val_objects``, the objects with the smallest ``u`` are added until
  there are that many, but never more than half of the dataset (a 4-object test set
  splits 2 / 2, not 4 / 0).
* One rendered view of every training object (``split_holdout_view``, default -1 = the
  last view) is never shown to training. Evaluation group "seen_view" scores training
  objects from that view; group "heldout_objects" scores the validation objects, which
  training never saw at all.

The settings live in :class:`~mar3d.data.config.DataConfig` and so in the dataset's
manifest: training and evaluation read the same split from the dataset itself.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Iterable, Literal

Split = Literal["train", "val", "all"]
SPLITS = ("train", "val", "all")

# Defaults of the DataConfig split settings (also used for manifests written before them).
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_MIN_VAL_OBJECTS = 4
DEFAULT_HOLDOUT_VIEW = -1
DEFAULT_SALT = "mar3d-split-v1"


def split_score(uid: str, salt: str = DEFAULT_SALT) -> float:
    """The uid's stable position in [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{uid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class DatasetSplit:
    """Which uids are train / val, and which view index training never sees."""

    train: frozenset[str]
    val: frozenset[str]
    holdout_view: int | None       # absolute view index, None = every view is a training view
    num_views: int

    def uids(self, split: Split) -> frozenset[str]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "all":
            return self.train | self.val
        return self.train if split == "train" else self.val

    def training_views(self) -> list[int]:
        return [v for v in range(self.num_views) if v != self.holdout_view]

    def evaluation_view(self) -> int:
        """The view evaluation conditions on: the held-out view (else view 0)."""
        return 0 if self.holdout_view is None else self.holdout_view


def assign_split(uids: Iterable[str], val_fraction: float = DEFAULT_VAL_FRACTION,
                 min_val_objects: int = DEFAULT_MIN_VAL_OBJECTS,
                 holdout_view: int | None = DEFAULT_HOLDOUT_VIEW, num_views: int = 1,
                 salt: str = DEFAULT_SALT) -> DatasetSplit:
    """Split ``uids`` as the module doc describes."""
    uids = sorted(set(uids))
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"split val_fraction must be in [0, 1), got {val_fraction}")
    if min_val_objects < 0:
        raise ValueError(f"split min_val_objects must be >= 0, got {min_val_objects}")
    ranked = sorted(uids, key=lambda u: (split_score(u, salt), u))
    by_hash = sum(split_score(u, salt) < val_fraction for u in uids)
    num_val = min(max(by_hash, min_val_objects), len(uids) // 2)
    view = resolve_holdout_view(holdout_view, num_views)
    return DatasetSplit(train=frozenset(ranked[num_val:]), val=frozenset(ranked[:num_val]),
                        holdout_view=view, num_views=num_views)


def resolve_holdout_view(holdout_view: int | None, num_views: int) -> int | None:
    """``holdout_view`` as an index in [0, num_views) (negative counts from the end)."""
    if holdout_view is None:
        return None
    if num_views < 2:
        raise ValueError(f"a held-out view needs at least 2 rendered views (the dataset has "
                         f"{num_views}); set split_holdout_view: null to train on every view")
    if not -num_views <= holdout_view < num_views:
        raise ValueError(f"split_holdout_view {holdout_view} is outside the {num_views} rendered views")
    return holdout_view % num_views


def split_from_manifest(manifest: dict, uids: Iterable[str]) -> DatasetSplit:
    """The split of a dataset's ``uids`` under the settings its manifest records."""
    cfg = manifest["config"]
    return assign_split(uids, cfg.get("split_val_fraction", DEFAULT_VAL_FRACTION),
                        cfg.get("split_min_val_objects", DEFAULT_MIN_VAL_OBJECTS),
                        cfg.get("split_holdout_view", DEFAULT_HOLDOUT_VIEW),
                        int(cfg["render_views"]), cfg.get("split_salt", DEFAULT_SALT))


_VARIANT = re.compile(r"^[0-9a-f]{16}-(?P<family>\d+)-[a-z]+_")


def shape_family(uid: str) -> str:
    """Objects that are variants of one design share a family: YCB's ``065-a_cups`` ..
    ``065-j_cups`` are family ``065``. Any other uid is its own family."""
    m = _VARIANT.match(uid)
    return m["family"] if m else uid
