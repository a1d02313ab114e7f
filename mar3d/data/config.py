"""DataConfig: every knob of the mesh -> Parquet shard preparation job.

Defaults follow MAR-3D / CraftsMan (3 pyramid levels of 16384/4096/1024 surface points,
occupancy in [-1.05, 1.05]^3, 8 RGBA condition views at 224 px) with a watertight grid
of 128^3: about 1 s per mesh on one core, against several seconds at 256^3. The
default "snap" watertight method puts the surface samples and occupancy labels on the
original surface (benchmarks/data_fidelity.py measures how closely); gaps narrower
than ~2 ``watertight_epsilon_voxels`` voxels (~0.034 at 128^3) are still closed, so
raise the resolution when fine gaps matter more than throughput.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

SCHEMA_VERSION = 1

# How the watertight surface is made (mar3d/data/watertight.py); the first is the default.
WATERTIGHT_METHODS = ("snap", "offset")

# File types the loader accepts (scenes are flattened into one mesh).
MESH_SUFFIXES = (".glb", ".gltf", ".obj", ".ply", ".stl", ".off")


@dataclass
class DataConfig:
    # --- normalization ---------------------------------------------------------------
    # Half-extent of the longest bounding-box axis after normalization; the box is
    # centred at the origin, so the mesh lies in [-normalize_extent, normalize_extent]^3.
    normalize_extent: float = 1.0

    # --- watertight conversion (unsigned distance grid + flood fill + marching cubes) --
    watertight_resolution: int = 128
    # Iso-level of the offset surface, in voxels. >= 0.5 guarantees the flood fill cannot
    # leak through a surface (two face-adjacent samples straddling it are <= 1 voxel apart).
    watertight_epsilon_voxels: float = 1.0
    # "snap": the epsilon level set's vertices moved back onto the input surface, so labels
    # and surface samples describe the object itself (thin sheets keep a one-voxel shell);
    # "offset": the epsilon level set as is, every shape ~epsilon fat (CraftsMan / Dora /
    # Hunyuan3D-2.1 preprocessing). Measured in benchmarks/data_fidelity.py.
    watertight_method: str = "snap"
    # With "snap": a mesh that already bounds a solid (every edge shared by two faces,
    # consistent winding, no crossing or same-orientation nested parts; watertight.py's
    # closed_input) is used as it is: exact labels, no grid. Off: every mesh is gridded.
    watertight_reuse_closed: bool = True

    # --- surface point pyramid -----------------------------------------------------------
    # Level 0 is the finest; each level is sampled independently from the watertight mesh.
    surface_sizes: tuple[int, ...] = (16384, 4096, 1024)
    # Fraction of each level's points placed on sharp edges (Dora's sharp-edge sampling);
    # 0 disables. Sharp edges are detected on the ORIGINAL mesh (marching-cubes meshes
    # have staircase dihedrals everywhere); with the offset method they are projected
    # onto the watertight surface.
    # 0: Dora's 0.5 gave no consistent gain on edge-rich YCB objects (benchmarks/sharp_edges.py, README).
    sharp_edge_fraction: float = 0.0
    sharp_edge_angle_deg: float = 30.0

    # --- occupancy supervision -------------------------------------------------------------
    num_vol: int = 32768
    num_near: int = 32768
    vol_bound: float = 1.05
    # Near-surface points: surface samples + N(0, sigma^2) noise, split evenly across sigmas.
    near_sigmas: tuple[float, ...] = (0.005, 0.02)
    # Inside test applied to the watertight mesh: "embree" (ray parity, Embree BVH) or
    # "winding" (libigl fast winding number). Both agree on >99.9% of points on our
    # watertight meshes; embree measured ~1.5-3x faster at 200k points on 150k-face
    # meshes (benchmarks/data_throughput.py), so it is the default.
    inside_method: str = "embree"

    # --- condition renders ---------------------------------------------------------------
    render_views: int = 8
    render_resolution: int = 224
    # Elevations are cycled over the views; azimuths are evenly spaced from the offset
    # unless render_azimuths_deg lists one per view.
    render_elevations_deg: tuple[float, ...] = (20.0,)
    render_azimuth_offset_deg: float = 0.0
    render_azimuths_deg: tuple[float, ...] = ()
    render_fov_deg: float = 40.0
    # Camera distance puts the mesh's bounding sphere inside the frustum, times this margin.
    render_fit_margin: float = 1.1
    render_ambient: float = 0.35
    render_white_background: bool = True
    # The dataset's world up axis: "y" (glTF / Objaverse convention) or "z" (YCB scans).
    # Cameras orbit about it. glTF files are +Y up by their specification and are turned
    # into a z-up dataset's frame; OBJ/PLY/STL/OFF have no convention and are taken as is.
    render_up_axis: str = "y"

    # --- limits: inputs beyond them become error rows, never crashes -------------------
    max_faces: int = 2_000_000
    max_file_bytes: int = 512 * 1024 * 1024

    # --- splits (mar3d/data/splits.py): read from the manifest by training and evaluation
    # Objects whose uid hashes below the fraction are validation objects (at least
    # split_min_val_objects of them, at most half the dataset); training never sees them.
    split_val_fraction: float = 0.1
    split_min_val_objects: int = 4
    # The view of every training object that training never sees (-1 = the last view;
    # null = none): evaluation scores seen objects from this unseen view.
    split_holdout_view: int | None = -1
    split_salt: str = "mar3d-split-v1"

    # --- input selection: Objaverse 1.0 trees and Objaverse-XL tables only ----------------
    # (mar3d/data/sources.py). They live here so that a pipeline passes them as overrides.
    # LVIS category names: objects in none of them are not selected. Empty: every object.
    select_categories: tuple[str, ...] = ()
    # A file (local or s3://) of source uids, one per line (Objaverse uids or XL
    # fileIdentifiers); a listed uid the input lacks becomes a not_found error row.
    select_uids_file: str | None = None
    # At most this many objects: the first ones after sorting the selected uids.
    select_limit: int | None = None

    # --- procedural corpus (mar3d/data/synth.py) mixed into the inputs ---------------------
    # > 0: `mar3d data prepare` first makes this many objects with `mar3d data synth` (into
    # OUTPUT/corpus, once; a re-run finds them there) and prepares them with the inputs.
    # Their rows have source "mar3d-synth", which evaluation's synth_heldout group selects.
    synth_objects: int = 0
    synth_seed: int = 0

    # --- job layout ---------------------------------------------------------------------
    shard_size: int = 64
    num_workers: int = 2
    cpus_per_task: float = 1.0
    seed: int = 0
    # Re-process inputs recorded in errors.parquet on a re-run (off: a re-run is a no-op).
    retry_errors: bool = False

    def validate(self) -> None:
        def positive(name: str, value: float) -> None:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DataConfig.{name} must be a positive number, got {value!r}")

        positive("normalize_extent", self.normalize_extent)
        if self.normalize_extent > 1.0:
            raise ValueError("DataConfig.normalize_extent must be <= 1 (the unit cube [-1,1]^3)")
        if not 16 <= self.watertight_resolution <= 1024:
            raise ValueError(f"DataConfig.watertight_resolution must be in [16, 1024], "
                             f"got {self.watertight_resolution}")
        if not 0.5 <= self.watertight_epsilon_voxels <= 8:
            raise ValueError("DataConfig.watertight_epsilon_voxels must be in [0.5, 8] "
                             f"(below 0.5 the flood fill leaks), got {self.watertight_epsilon_voxels}")
        if self.watertight_method not in WATERTIGHT_METHODS:
            raise ValueError(f"DataConfig.watertight_method must be one of {WATERTIGHT_METHODS}, "
                             f"got {self.watertight_method!r}")
        if len(self.surface_sizes) < 1:
            raise ValueError("DataConfig.surface_sizes needs at least one level")
        for i, n in enumerate(self.surface_sizes):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"DataConfig.surface_sizes[{i}] must be a positive int, got {n!r}")
        if list(self.surface_sizes) != sorted(self.surface_sizes, reverse=True):
            raise ValueError("DataConfig.surface_sizes must be non-increasing (level 0 is finest), "
                             f"got {self.surface_sizes}")
        if not 0.0 <= self.sharp_edge_fraction < 1.0:
            raise ValueError(f"DataConfig.sharp_edge_fraction must be in [0, 1), got {self.sharp_edge_fraction}")
        if not 0.0 < self.sharp_edge_angle_deg < 180.0:
            raise ValueError(f"DataConfig.sharp_edge_angle_deg must be in (0, 180), got {self.sharp_edge_angle_deg}")
        for name in ("num_vol", "num_near"):
            if getattr(self, name) < 1:
                raise ValueError(f"DataConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.vol_bound < self.normalize_extent:
            raise ValueError("DataConfig.vol_bound must cover the normalized mesh (>= normalize_extent)")
        if not self.near_sigmas or any(not (s > 0) for s in self.near_sigmas):
            raise ValueError(f"DataConfig.near_sigmas must be a non-empty list of positive numbers, got {self.near_sigmas}")
        if self.inside_method not in ("winding", "embree"):
            raise ValueError(f"DataConfig.inside_method must be 'winding' or 'embree', got {self.inside_method!r}")
        if self.render_views < 1:
            raise ValueError(f"DataConfig.render_views must be >= 1, got {self.render_views}")
        if not 8 <= self.render_resolution <= 2048:
            raise ValueError(f"DataConfig.render_resolution must be in [8, 2048], got {self.render_resolution}")
        if not self.render_elevations_deg or any(abs(e) >= 90 for e in self.render_elevations_deg):
            raise ValueError("DataConfig.render_elevations_deg must be non-empty with |elevation| < 90")
        if self.render_azimuths_deg and len(self.render_azimuths_deg) != self.render_views:
            raise ValueError(f"DataConfig.render_azimuths_deg has {len(self.render_azimuths_deg)} entries "
                             f"but render_views is {self.render_views}")
        if not 5.0 <= self.render_fov_deg <= 120.0:
            raise ValueError(f"DataConfig.render_fov_deg must be in [5, 120], got {self.render_fov_deg}")
        if self.render_fit_margin < 1.0:
            raise ValueError(f"DataConfig.render_fit_margin must be >= 1, got {self.render_fit_margin}")
        if not 0.0 <= self.render_ambient <= 1.0:
            raise ValueError(f"DataConfig.render_ambient must be in [0, 1], got {self.render_ambient}")
        if self.render_up_axis not in ("y", "z"):
            raise ValueError(f"DataConfig.render_up_axis must be 'y' or 'z', got {self.render_up_axis!r}")
        if self.max_faces < 1:
            raise ValueError(f"DataConfig.max_faces must be >= 1, got {self.max_faces}")
        if self.max_file_bytes < 1:
            raise ValueError(f"DataConfig.max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if self.select_limit is not None and self.select_limit < 1:
            raise ValueError(f"DataConfig.select_limit must be >= 1 (or null for all), got {self.select_limit}")
        if any(not str(c).strip() for c in self.select_categories):
            raise ValueError(f"DataConfig.select_categories has an empty name: {self.select_categories}")
        if self.synth_objects < 0:
            raise ValueError(f"DataConfig.synth_objects must be >= 0, got {self.synth_objects}")
        if self.shard_size < 1:
            raise ValueError(f"DataConfig.shard_size must be >= 1, got {self.shard_size}")
        if self.num_workers < 1:
            raise ValueError(f"DataConfig.num_workers must be >= 1, got {self.num_workers}")
        positive("cpus_per_task", self.cpus_per_task)
        if not 0.0 <= self.split_val_fraction < 1.0:
            raise ValueError(f"DataConfig.split_val_fraction must be in [0, 1), got {self.split_val_fraction}")
        if self.split_min_val_objects < 0:
            raise ValueError(f"DataConfig.split_min_val_objects must be >= 0, got {self.split_min_val_objects}")
        if self.split_holdout_view is not None:
            from .splits import resolve_holdout_view

            resolve_holdout_view(self.split_holdout_view, self.render_views)

    # Derived views used by several modules.
    @property
    def num_levels(self) -> int:
        return len(self.surface_sizes)

    def view_angles(self) -> list[tuple[float, float]]:
        """(elevation, azimuth) in degrees for each rendered view."""
        if self.render_azimuths_deg:
            azimuths = list(self.render_azimuths_deg)
        else:
            azimuths = [self.render_azimuth_offset_deg + 360.0 * i / self.render_views
                        for i in range(self.render_views)]
        elevations = [self.render_elevations_deg[i % len(self.render_elevations_deg)]
                      for i in range(self.render_views)]
        return [(float(e), float(a) % 360.0) for e, a in zip(elevations, azimuths)]


def small_test_config(**overrides) -> DataConfig:
    """A tiny but complete configuration (fast enough for unit tests and smoke runs)."""
    base = dict(watertight_resolution=64, surface_sizes=(2048, 512, 128), num_vol=2048,
                num_near=2048, render_views=2, render_resolution=64, shard_size=2,
                num_workers=2)
    base.update(overrides)
    cfg = DataConfig(**base)
    cfg.validate()
    return cfg

