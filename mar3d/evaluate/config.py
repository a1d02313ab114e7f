"""Evaluation settings, the result it hands back, and the names of its outputs."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mar3d.inference import PipelineConfig
from mar3d.metrics import DEFAULT_THRESHOLD

REPORT_FILE = "report.json"
TABLE_FILE = "per_object.csv"
PREVIEW_DIR = "previews"
SHEET_DIR = "contact_sheets"
VIEW_DIR = "views"  # one rotatable 3D page per group (mar3d.viewer)
GROUPS = ("seen_view", "heldout_objects", "synth_heldout", "all_objects")
GROUP_DESCRIPTIONS = {
    "seen_view": "training objects, seen from the view training never showed",
    "heldout_objects": "objects training never saw",
    "synth_heldout": "procedural corpus objects training never saw",
    "all_objects": "every object of the dataset",
}
SCORE_KEYS = ("chamfer", "f_score", "precision", "recall", "normal_consistency", "iou")
# Failed objects enter the all-object means with these values (see :mod:`mar3d.evaluate`).
FAILED_SCORES = {"chamfer": None, "f_score": 0.0, "precision": 0.0, "recall": 0.0,
                 "normal_consistency": 0.0, "iou": 0.0}
# Labels carried into the per-object records, so scores can be joined back to Objaverse
# uids and compared by category (null for datasets without them).
_RECORD_LABELS = ("source_uid", "category")


@dataclass
class EvalConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    groups: tuple[str, ...] = ("seen_view", "heldout_objects")
    view_index: int | None = None        # condition view; None = the dataset's held-out view
    max_objects: int | None = None       # per group, in the split's hash order; None = all
    group_max_objects: dict[str, int] = field(default_factory=dict)  # per-group max_objects
    distinct_families: bool = True       # seen_view: one object per shape family
    seed: int = 0                        # sampling seed, the same for every object
    batch_size: int = 8                  # objects sampled together (results do not depend on it)
    num_points: int = 50_000             # points sampled from each generated mesh
    fscore_threshold: float = DEFAULT_THRESHOLD
    with_iou: bool = True
    with_vae_iou: bool = True            # also score the VAE's reconstruction (the ceiling)
    baseline: bool = True                # the constant mean-shape prediction, per group
    baseline_pool: int = 256             # training objects the mean shape is chosen among
    retrieval_points: int = 4096         # points per shape in the cross-object Chamfer matrices
    previews: int = 4                    # detailed preview images for the first N of each group
    preview_resolution: int = 256
    contact_sheet: bool = True           # one PNG grid per group (input | generated | truth)
    contact_sheet_resolution: int = 128
    view_pages: bool = True              # one HTML page per group: input | generated | truth, in 3D
    experiment: str = "mar3d-eval"
    run_name: str = ""                   # "" = "eval-<dataset folder name>"
    device: str = "auto"                 # "auto" | "cpu" | "cuda" | "cuda:N"

    def validate(self) -> None:
        self.pipeline.validate()
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups must list distinct values of {GROUPS}, got {list(self.groups)}")
        bad = [g for g in self.groups if g not in GROUPS]
        if bad:
            raise ValueError(f"unknown evaluation groups {bad}; choose from {GROUPS}")
        if self.view_index is not None and self.view_index < 0:
            raise ValueError(f"view_index must be >= 0 or null, got {self.view_index}")
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or null, got {self.max_objects}")
        for name, count in self.group_max_objects.items():
            if name not in GROUPS:
                raise ValueError(f"group_max_objects names unknown group {name!r}; choose from {GROUPS}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"group_max_objects[{name}] must be an integer >= 1, got {count!r}")
        for name in ("num_points", "baseline_pool", "retrieval_points", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.fscore_threshold) and self.fscore_threshold > 0):
            raise ValueError(f"fscore_threshold must be > 0, got {self.fscore_threshold}")
        if self.previews < 0:
            raise ValueError(f"previews must be >= 0, got {self.previews}")
        for name in ("preview_resolution", "contact_sheet_resolution"):
            if not 32 <= getattr(self, name) <= 2048:
                raise ValueError(f"{name} must be in [32, 2048], got {getattr(self, name)}")
        if not self.experiment:
            raise ValueError("experiment must be a non-empty MLflow experiment name")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class EvalResult:
    metrics: dict[str, float]            # flat: "<group>/<metric>", "<group>/baseline/<metric>", ...
    per_object: list[dict[str, Any]]     # the candidate's rows of every group
    report_path: Path | str             # a local file, or its URI when the output is remote
    run_id: str
    failed: list[dict[str, Any]]         # the per-object rows with status "failed"
    tracking_uri: str = ""
    contact_sheets: dict[str, Path | str] = field(default_factory=dict)
    view_pages: dict[str, Path | str] = field(default_factory=dict)  # group -> its 3D page
