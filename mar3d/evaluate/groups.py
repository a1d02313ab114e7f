"""Which objects each evaluation group scores, how their stored rows are read, and the
fingerprints (dataset content, scoring protocol) that make two evaluations comparable."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mar3d.config import to_dict
from mar3d.evaluate.config import _RECORD_LABELS, EvalConfig

_SHARD_COLUMNS = ["uid", "surface_0", "vol_points", "vol_labels", "images",
                  "cam_world_to_cam", "cam_intrinsics"]


def dataset_fingerprint(root: str | Path) -> dict[str, Any]:
    """Content identity of a prepared dataset: sha256 over its complete shards' hashes
    (the manifest's timestamps change on every re-run, the shard contents do not)."""
    from mar3d.data.prepare import complete_shards, load_manifest, watertight_method

    manifest = load_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root} has no manifest.json: run `mar3d data prepare` first")
    shards = complete_shards(root, manifest, verify=False)
    listing = sorted((s["file"], s["sha256"], int(s["rows"])) for s in shards)
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"hash": digest, "rows": sum(r for _, _, r in listing), "shards": len(listing),
            "schema_version": manifest.get("schema_version"),
            "watertight_method": watertight_method(manifest)}


@dataclass
class EvalGroup:
    name: str
    view: int
    indices: list[int]                   # rows of the dataset reader
    uids: list[str]
    view_seen_in_training: bool = False  # true only for a dataset without a held-out view
    # The training objects of the group's collection: its mean-shape baseline is chosen
    # among them (a corpus group gets a corpus shape, a scan group a scan).
    training_pool: frozenset[str] = frozenset()


def group_pools(reader) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """(objects to score, training pool of their collection) of every group: corpus rows
    (source ``mar3d-synth``) form synth_heldout; seen_view and heldout_objects take the
    other rows, or every row of a dataset that is all corpus."""
    from mar3d.data.synth import SYNTH_SOURCE

    split = reader.split_info
    corpus = frozenset(u for u, src in zip(reader.uids, reader.sources) if src == SYNTH_SOURCE)
    everything = split.train | split.val
    others = (everything - corpus) or everything
    return {"seen_view": (split.train & others, split.train & others),
            "heldout_objects": (split.val & others, split.train & others),
            "synth_heldout": (split.val & corpus, split.train & corpus),
            "all_objects": (everything, split.train)}


def select_groups(reader, cfg: EvalConfig) -> list[EvalGroup]:
    """The objects of each group (see :mod:`mar3d.evaluate`), from a split-"all" ShapeDataset."""
    from mar3d.data.splits import shape_family, split_score

    split = reader.split_info
    view = split.evaluation_view() if cfg.view_index is None else cfg.view_index
    if not 0 <= view < split.num_views:
        raise ValueError(f"view_index {view} outside the dataset's {split.num_views} views")
    position = {uid: i for i, uid in enumerate(reader.uids)}
    pools = group_pools(reader)
    groups = []
    for name in cfg.groups:
        scored, training = pools[name]
        ordered = sorted(scored, key=lambda u: (split_score(u), u))
        if name == "seen_view" and cfg.distinct_families:
            seen: set[str] = set()
            ordered = [u for u in ordered if not (shape_family(u) in seen or seen.add(shape_family(u)))]
        limit = cfg.group_max_objects.get(name, cfg.max_objects)
        chosen = ordered[:limit] if limit else ordered
        groups.append(EvalGroup(name, view, [position[u] for u in chosen], chosen,
                                view_seen_in_training=name == "seen_view" and split.holdout_view != view,
                                training_pool=training))
    if not any(g.indices for g in groups):
        raise ValueError(f"no objects to evaluate in groups {list(cfg.groups)} "
                         f"({len(split.train)} training / {len(split.val)} validation objects)")
    return groups


class EvalRows:
    """The stored rows evaluation needs, by dataset row and view."""

    def __init__(self, reader):
        self.reader = reader
        self._files: dict[Path, Any] = {}

    def get(self, index: int, view: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from mar3d.data.schema import column_to_numpy, label_columns

        path, group = self.reader.index[index]
        if path not in self._files:
            self._files[path] = pq.ParquetFile(path)
        levels = [f"surface_{k}" for k in range(1, len(self.reader.surface_sizes))]
        tensors = _SHARD_COLUMNS[1:] + levels
        present = label_columns(self._files[path].schema_arrow, _RECORD_LABELS)  # older shards: none
        table = self._files[path].read_row_group(group, columns=["uid", *tensors, *present])
        row = {name: column_to_numpy(table.column(name))[0] for name in tensors}
        labels = {name: table.column(name)[0].as_py() for name in present}
        # np.array copies: slices of Arrow buffers are read-only, torch wants writable memory.
        return {"uid": table.column("uid")[0].as_py(), **{k: labels.get(k) for k in _RECORD_LABELS},
                "surface": row["surface_0"], "vol_points": row["vol_points"],
                "vol_labels": row["vol_labels"], "image": np.array(row["images"][view]),
                "world_to_cam": row["cam_world_to_cam"][view], "intrinsics": row["cam_intrinsics"][view],
                "surfaces": [row["surface_0"]] + [row[name] for name in levels]}


def protocol_fingerprint(group: EvalGroup, dataset_hash: str, cfg: EvalConfig) -> str:
    """Identity of "the same objects, scored the same way": two evaluations with equal
    fingerprints are comparable metric by metric (the promotion gate relies on it)."""
    doc = {"dataset": dataset_hash, "group": group.name, "uids": group.uids, "view": group.view,
           "pipeline": to_dict(cfg.pipeline), "seed": cfg.seed, "num_points": cfg.num_points,
           "threshold": cfg.fscore_threshold}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
