"""What a batch generation job is asked (``GenerateConfig``), what it answers
(``GenerateResult``), and the names of the files it writes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mar3d.inference import PipelineConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MESH_FORMATS = ("glb", "obj", "ply")
RESULTS = "results.parquet"
SETTINGS = "generate.json"
MESHES = "meshes"
CONTACT_SHEET = "contact_sheet.png"
GALLERY = "gallery.html"  # every result, paged, with rotatable meshes (mar3d.viewer)

# Errors that the same input, model and settings reproduce exactly: a re-run skips them
# (unless ``retry_errors``). Anything else (``internal_error``, ``write_error``) is retried.
DETERMINISTIC_REASONS = frozenset({"not_image", "invalid_image", "missing_image", "unsafe_id",
                                   "duplicate_id", "no_surface"})


@dataclass
class GenerateConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    num_actors: int = 2
    cpus_per_actor: float = 1.0           # fractional values let several actors share a core
    gpus_per_actor: float | None = None   # None (auto): 1, or a share when actors > GPUs; 0 without GPUs
    use_gpu: bool = True
    batch_size: int = 4                   # items per actor call, sampled as one batch (and per Ray block)
    formats: tuple[str, ...] = ("glb",)   # any of glb / obj / ply
    base_seed: int = 0
    view_index: int = 0                   # shard datasets: which stored view to condition on
    all_views: bool = False               # shard datasets: one item per stored view
    max_items: int | None = None          # only the first N listed items (sorted by id)
    # Shard datasets: rows whose ``source`` label is one of these are left out (the local
    # demo generates for its scans, not for the procedural corpus it trained on); the
    # count left out is logged.
    exclude_sources: tuple[str, ...] = ()
    retry_errors: bool = False            # also redo items with deterministic errors
    checkpoint_seconds: float = 10.0      # rewrite results.parquet at least this often
    # contact_sheet.png: input | generated | ground truth (shard inputs) for the first N
    # items (0: none); logged to MLflow with the job's counts in ``experiment``.
    contact_sheet_items: int = 48
    contact_sheet_resolution: int = 128
    gallery: bool = True                  # gallery.html beside results.parquet (logged with the run)
    up_axis: str = "auto"                 # world up of the shapes for the sheet's side view:
                                          # auto = the dataset's (shard inputs), else "y"
    experiment: str = "mar3d-generate"

    def validate(self) -> None:
        self.pipeline.validate()
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0 (or null for auto), got {self.gpus_per_actor}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.formats:
            raise ValueError(f"formats must name at least one of {MESH_FORMATS}")
        bad = [f for f in self.formats if f not in MESH_FORMATS]
        if bad or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must be distinct values from {MESH_FORMATS}, got {list(self.formats)}")
        if not 0 <= self.base_seed < 2 ** 32:
            raise ValueError(f"base_seed must be in [0, 2^32), got {self.base_seed}")
        if self.view_index < 0:
            raise ValueError(f"view_index must be >= 0, got {self.view_index}")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"max_items must be >= 1 (or null for all), got {self.max_items}")
        if self.checkpoint_seconds <= 0:
            raise ValueError(f"checkpoint_seconds must be > 0, got {self.checkpoint_seconds}")
        if self.contact_sheet_items < 0:
            raise ValueError(f"contact_sheet_items must be >= 0, got {self.contact_sheet_items}")
        if not 32 <= self.contact_sheet_resolution <= 1024:
            raise ValueError(f"contact_sheet_resolution must be in [32, 1024], got {self.contact_sheet_resolution}")
        if self.up_axis not in ("auto", "y", "z"):
            raise ValueError(f"up_axis must be auto, y or z, got {self.up_axis!r}")
        if not self.experiment:
            raise ValueError("experiment must be a non-empty MLflow experiment name")


@dataclass
class GenerateResult:
    output: Path | str   # a local folder, or the URI of a remote one
    total: int           # items listed (after max_items), good and bad
    succeeded: int       # new meshes written by this run
    failed: int          # new error rows recorded by this run
    skipped: int         # items already finished (ok or deterministic error) before this run
    results_path: Path | str
    seconds: float
    model: str = ""      # resolved model URI
    reasons: dict[str, int] = field(default_factory=dict)  # this run's error reasons
    contact_sheet: Path | str | None = None
    gallery: Path | str | None = None
    run_id: str = ""     # the MLflow run holding the job's counts and contact sheet

    @property
    def shapes_per_second(self) -> float:
        return self.succeeded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"output": str(self.output), "total": self.total, "succeeded": self.succeeded,
                "failed": self.failed, "skipped": self.skipped, "results_path": str(self.results_path),
                "seconds": round(self.seconds, 3), "shapes_per_second": round(self.shapes_per_second, 4),
                "model": self.model, "reasons": dict(self.reasons),
                "contact_sheet": str(self.contact_sheet) if self.contact_sheet else None,
                "gallery": str(self.gallery) if self.gallery else None,
                "run_id": self.run_id}

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
        return (f"{self.total} items: {self.succeeded} meshes, {self.failed} errors"
                f"{f' ({reasons})' if reasons else ''}, {self.skipped} already done; "
                f"{self.seconds:.1f} s ({self.shapes_per_second:.2f} shapes/s); results in {self.results_path}"
                + (f"; contact sheet {self.contact_sheet}" if self.contact_sheet else "")
                + (f"; gallery {self.gallery}" if self.gallery else ""))
