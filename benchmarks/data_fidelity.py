"""Do the prepared rows describe the original mesh? Prepared geometry vs the original.

For each real mesh, the geometry columns of its dataset row (``surface_{k}``,
``vol_*``, ``near_*``) are made by the data job's own per-mesh function
(``mar3d.data.prepare.sample_geometry``, the code ``mar3d data prepare`` runs) for every
watertight method and grid resolution asked for, and compared, in the normalized frame,
with the original mesh:

* **CD**: Chamfer distance (symmetric mean, ``mar3d.metrics``) of ``surface_0`` to as
  many points sampled on the original; the **floor** row is a second independent sample
  of the original against the first, i.e. what a perfect surface sample scores;
* **off-surface**: mean exact distance of the ``surface_0`` points to the original mesh
  (no sampling floor: 0 for points on the original);
* **NC**: normal consistency (mean |cos| of nearest neighbours, both directions) against
  the original's face normals;
* **missed**: fraction of the original's surface points farther than ``--miss-distance``
  (0.02) from every ``surface_0`` point (parts lost, or too few samples: see the floor);
* **vol / near agree**: label agreement on the stored uniform and near-surface points
  with the generalized winding number of the original (> 1/2 inside; libigl), with the
  near-surface agreement also per noise scale (sigma 0.005 / 0.02 by default);
* **snap+closed** is the data job's default: "snap", except that a mesh which already
  bounds a solid (``watertight.closed_input``: closed, consistently wound, no crossing or
  nested parts) is sampled and labelled as it is, without the grid; the "snap" and
  "offset" rows grid every mesh;
* **s/mesh**: wall seconds of ``sample_geometry`` per mesh (watertight + surface
  pyramid + occupancy labels; loading and rendering are the same for every method), one
  process; **CPU s/mesh**: the process's CPU seconds for the same work (all its threads),
  which a machine shared with other jobs disturbs far less: the ratio column uses it.

The winding number is the reference because the YCB scans are closed; the "snap" method
uses it only to tell solid from sheet behind a vertex, while its labels come from ray
parity on its own watertight mesh, so the agreement is not the reference checking itself.

Prints one markdown table per resolution and, with ``--json``, every per-mesh number.

    python benchmarks/data_fidelity.py                               # 10 YCB objects, 128 + 256
    python benchmarks/data_fidelity.py --resolutions 128 --methods snap --objects 025_mug 024_bowl
    python benchmarks/data_fidelity.py --resolutions 128 --synth 17   # + one corpus object per category
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_YCB = REPO.parent / "shared" / "datasets" / "ycb"
# Varied on purpose: boxes, thin walls (bowl, plate), tools, an organic shape, a chain of
# separate links and a multi-part toy.
DEFAULT_OBJECTS = ("003_cracker_box", "011_banana", "024_bowl", "025_mug", "029_plate",
                   "035_power_drill", "037_scissors", "048_hammer", "059_chain",
                   "072-a_toy_airplane")
COLUMNS = ("cd", "nc", "missed", "vol_agree", "near_agree", "seconds")
REUSE = "snap+closed"  # DataConfig.watertight_reuse_closed on; the plain methods run with it off


def method_overrides(method: str) -> list[str]:
    if method == REUSE:
        return ["watertight_method=snap", "watertight_reuse_closed=true"]
    return [f"watertight_method={method}", "watertight_reuse_closed=false"]


def parse_args(argv=None) -> argparse.Namespace:
    from mar3d.data.config import WATERTIGHT_METHODS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--ycb", type=Path, default=Path(os.environ.get("MAR3D_YCB", DEFAULT_YCB)),
                   help="YCB root (<object>/textured.obj)")
    p.add_argument("--objects", nargs="+", default=list(DEFAULT_OBJECTS),
                   help="YCB object folders to measure (default: 10 varied objects)")
    p.add_argument("--resolutions", type=int, nargs="+", default=[128, 256],
                   help="watertight grid resolutions; one table each")
    p.add_argument("--methods", nargs="+", default=[*WATERTIGHT_METHODS, REUSE],
                   choices=[*WATERTIGHT_METHODS, REUSE],
                   help=f"watertight methods (rows of each table); {REUSE!r} = snap, but a mesh that "
                        "already bounds a solid is used as it is (the data job's default)")
    p.add_argument("--miss-distance", type=float, default=0.02,
                   help="an original surface point farther than this from surface_0 is missed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="other DataConfig fields, e.g. --set num_near=65536")
    p.add_argument("--synth", type=int, default=0, metavar="N",
                   help="also measure the first N objects of the procedural corpus (`mar3d data "
                        "synth`, seed 0: one per category in turn; CAD-like flat extremes)")
    p.add_argument("--json", type=Path, help="write every per-mesh number here")
    return p.parse_args(argv)


def synth_objects(count: int) -> tuple[list[str], list[Path]]:
    """The first ``count`` corpus objects, written to a temporary folder."""
    import tempfile

    from mar3d.data.synth import SynthConfig, make_object

    folder = Path(tempfile.mkdtemp(prefix="mar3d-fidelity-synth-"))
    cfg = SynthConfig(num_objects=count)
    names, paths = [], []
    for index in range(count):
        glb, record = make_object(index, cfg, [])
        path = folder / f"{record['uid']}.glb"
        path.write_bytes(glb)
        names.append(f"synth-{record['categories'][0]}-{index}")
        paths.append(path)
    return names, paths


def original_mesh(path: Path):
    """The mesh as the data job loads it (normalized frame), as a trimesh."""
    import trimesh

    from mar3d.data.mesh_io import load_mesh, sha256_file

    loaded = load_mesh(path, max_faces=10**8, max_file_bytes=1 << 40)
    return loaded, trimesh.Trimesh(loaded.vertices, loaded.faces, process=False), sha256_file(path)


def surface_scores(points: np.ndarray, normals: np.ndarray, gt_points: np.ndarray,
                   gt_normals: np.ndarray, miss_distance: float, original) -> dict:
    import igl
    from scipy.spatial import cKDTree

    from mar3d.metrics import chamfer_distance, normal_consistency

    missed, _ = cKDTree(points).query(gt_points, k=1, workers=-1)
    off, _, _ = igl.point_mesh_squared_distance(np.asarray(points, np.float64), original.vertices,
                                                original.faces)
    return {"cd": chamfer_distance(points, gt_points), "off_surface": float(np.sqrt(off).mean()),
            "nc": normal_consistency(points, normals, gt_points, gt_normals),
            "missed": float((missed > miss_distance).mean())}


def label_scores(row: dict, original, sigmas: tuple[float, ...]) -> dict:
    """Agreement of the stored labels with the original's winding number (> 1/2)."""
    from mar3d.metrics import inside_mask

    vol = inside_mask(original, row["vol_points"]) == row["vol_labels"].astype(bool)
    near = inside_mask(original, row["near_points"]) == row["near_labels"].astype(bool)
    # sample_occupancy stores the near points grouped by sigma, in the order given.
    counts = np.full(len(sigmas), len(near) // len(sigmas))
    counts[: len(near) % len(sigmas)] += 1
    groups = np.split(near, np.cumsum(counts)[:-1])
    out = {"vol_agree": float(vol.mean()), "near_agree": float(near.mean())}
    out.update({f"near_agree@{s:g}": float(g.mean()) for s, g in zip(sigmas, groups)})
    return out


def measure(loaded, original, gt: tuple[np.ndarray, np.ndarray], sha256: str, cfg,
            miss_distance: float) -> dict:
    """Scores of one config's geometry; ``gt``: points + normals sampled on the original,
    as many as ``surface_0`` holds."""
    from mar3d.data.prepare import sample_geometry

    rng = np.random.default_rng([cfg.seed, int(sha256[:12], 16)])  # as process_mesh seeds it
    start, start_cpu = time.perf_counter(), time.process_time()
    row = sample_geometry(loaded, cfg, rng)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    surface = row["surface_0"]
    scores = surface_scores(surface[:, :3], surface[:, 3:], *gt, miss_distance, original)
    scores.update(label_scores(row, original, cfg.near_sigmas))
    scores["seconds"], scores["cpu_seconds"] = seconds, cpu_seconds
    return scores


def floor_scores(original, gt: tuple[np.ndarray, np.ndarray], miss_distance: float) -> dict:
    """A perfect sampler: a second independent sample of the original vs ``gt``."""
    from mar3d.metrics import sample_surface

    points, normals = sample_surface(original, len(gt[0]), seed=2)
    return surface_scores(points, normals, *gt, miss_distance, original)


def mean_of(rows: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def format_table(resolution: int, results: dict, floor: dict, sigmas: tuple[float, ...],
                 baseline_seconds: float | None) -> str:
    near_cols = [f"near_agree@{s:g}" for s in sigmas]
    head = (["method", "CD", "off-surface", "NC", "missed", "vol agree", "near agree"]
            + [f"near σ={s:g}" for s in sigmas] + ["s/mesh", "CPU s/mesh", "CPU vs offset@128"])
    lines = [f"watertight grid {resolution}³, {len(floor)} meshes, means over meshes",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, rows in results.items():
        m = mean_of(rows)
        ratio = f"{m['cpu_seconds'] / baseline_seconds:.2f}×" if baseline_seconds else "-"
        cells = [method, f"{m['cd']:.3e}", f"{m['off_surface']:.2e}", f"{m['nc']:.4f}", f"{m['missed']:.4f}",
                 f"{m['vol_agree']:.4f}", f"{m['near_agree']:.4f}"]
        cells += [f"{m[c]:.4f}" for c in near_cols] + [f"{m['seconds']:.2f}", f"{m['cpu_seconds']:.2f}", ratio]
        lines.append("| " + " | ".join(cells) + " |")
    f = mean_of(floor)
    cells = ["floor (original vs original)", f"{f['cd']:.3e}", f"{f['off_surface']:.2e}", f"{f['nc']:.4f}",
             f"{f['missed']:.4f}"]
    lines.append("| " + " | ".join(cells + ["-"] * (len(head) - len(cells))) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from mar3d.config import load_config
    from mar3d.data.config import DataConfig
    from mar3d.logs import progress_bar
    from mar3d.metrics import sample_surface

    names = list(args.objects)
    paths = [args.ycb / name / "textured.obj" for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        sys.exit(f"error: no mesh at {', '.join(missing)} (set --ycb or MAR3D_YCB)")
    if args.synth:
        synth_names, synth_paths = synth_objects(args.synth)
        names, paths = names + synth_names, paths + synth_paths
    configs = {(r, m): load_config(DataConfig, None, [*args.set, f"watertight_resolution={r}",
                                                      *method_overrides(m)])
               for r in args.resolutions for m in args.methods}
    for cfg in configs.values():
        cfg.validate()
    sigmas = next(iter(configs.values())).near_sigmas
    per_mesh: dict = {f"{r}/{m}": {} for r, m in configs}
    floors = []
    bar = progress_bar(len(paths) * len(configs), "data fidelity", "run")
    for name, path in zip(names, paths):
        loaded, original, sha256 = original_mesh(path)
        # --set applies to every config, so all share one surface_0 size and one GT sample.
        gt = sample_surface(original, next(iter(configs.values())).surface_sizes[0], seed=1)
        floors.append(floor_scores(original, gt, args.miss_distance))
        for (r, m), cfg in configs.items():
            per_mesh[f"{r}/{m}"][name] = measure(loaded, original, gt, sha256, cfg, args.miss_distance)
            bar.update(1)
    bar.close()
    floor_of = dict(zip(names, floors))
    sets = {"YCB scans": list(args.objects), "procedural corpus": names[len(args.objects):]}
    for title, members in sets.items():
        if not members:
            continue
        base_rows = [per_mesh["128/offset"][n] for n in members] if "128/offset" in per_mesh else None
        baseline = mean_of(base_rows)["cpu_seconds"] if base_rows else None
        for r in args.resolutions:
            results = {m: [per_mesh[f"{r}/{m}"][n] for n in members] for m in args.methods}
            print(f"{title}: " + format_table(r, results, [floor_of[n] for n in members], sigmas, baseline) + "\n")
    report = {"objects": names, "per_mesh": per_mesh, "floor": floor_of}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
