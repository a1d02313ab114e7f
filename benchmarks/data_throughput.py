"""Data-job throughput on YCB and the inside-test comparison that chose the labeller.

Prints markdown tables:
1. meshes/s of the full per-mesh processing (prepare_dataset, fresh output each time)
   with 1 and 2 Ray workers, plus a per-stage time breakdown on one core;
2. inside test on a watertight YCB mesh at --inside-points query points: libigl fast
   winding number and Embree ray parity against trimesh's pure-Python ray-triangle
   `contains`, as speed ratios measured in the same run, with label agreement.

The pure-Python baseline needs ~20 ms per query point on a 128^3 watertight mesh (over an
hour at 200k points), so by default it runs on --naive-points points and its time is
scaled linearly to --inside-points (rays are independent, so cost is linear in points);
pass --naive-points equal to --inside-points to measure it in full.

    python benchmarks/data_throughput.py --limit 8
    python benchmarks/data_throughput.py            # all 78 YCB objects
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_YCB = REPO.parent / "shared" / "datasets" / "ycb"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ycb", type=Path, default=Path(os.environ.get("MAR3D_YCB", DEFAULT_YCB)),
                   help="YCB root (folders with textured.obj)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N objects (sorted)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to time")
    p.add_argument("--config", type=Path, default=None, help="DataConfig YAML (default: built-in defaults)")
    p.add_argument("--inside-points", type=int, default=200_000)
    p.add_argument("--naive-points", type=int, default=4000,
                   help="points for the slow pure-Python baseline (scaled to --inside-points)")
    p.add_argument("--inside-mesh", default="025_mug", help="YCB object for the inside test")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-inside", action="store_true")
    return p.parse_args(argv)


def ycb_inputs(root: Path, limit: int | None) -> list[Path]:
    objs = sorted(p for p in root.iterdir() if (p / "textured.obj").is_file())
    if not objs:
        raise SystemExit(f"no YCB objects under {root}")
    return objs[:limit] if limit else objs


def throughput(objs: list[Path], cfg, workers: list[int]) -> list[tuple]:
    import ray

    from mar3d.data import prepare_dataset

    rows = []
    ray.init(num_cpus=max(max(workers), os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inputs = Path(tmp) / "in"
            inputs.mkdir()
            for o in objs:
                os.symlink(o, inputs / o.name)
            # Warm-up (discarded): start the Ray workers and import the stack in them, so
            # the first timed configuration does not pay for process start-up.
            warm = Path(tmp) / "warm"
            warm.mkdir()
            for o in objs[: max(workers)]:
                os.symlink(o, warm / o.name)
            cfg.num_workers = max(workers)
            prepare_dataset(warm, Path(tmp) / "warm_out", cfg, progress=False)
            for n in workers:
                cfg.num_workers = n
                out = Path(tmp) / f"out{n}"
                res = prepare_dataset(inputs, out, cfg, progress=sys.stderr.isatty())
                rows.append((n, len(objs), res.processed, res.failed, res.seconds,
                             (res.processed + res.failed) / res.seconds))
                shutil.rmtree(out)
    finally:
        ray.shutdown()
    return rows


def stage_breakdown(objs: list[Path], cfg, count: int = 3) -> dict[str, float]:
    """Mean seconds per stage over the first ``count`` objects, in this process."""
    from mar3d.data.mesh_io import load_mesh
    from mar3d.data.render import render_views
    from mar3d.data.sampling import sample_occupancy, sharp_edges, surface_pyramid
    from mar3d.data.watertight import make_watertight

    totals: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        totals[name] = totals.get(name, 0.0) + time.perf_counter() - t
        return out

    for o in objs[:count]:
        rng = np.random.default_rng(0)
        mesh = timed("load + normalize", lambda: load_mesh(o / "textured.obj", cfg.max_faces,
                                                              cfg.max_file_bytes, cfg.normalize_extent))
        closed = timed(f"watertight {cfg.watertight_resolution}^3", lambda: make_watertight(
            mesh.vertices, mesh.faces, cfg.watertight_resolution, cfg.watertight_epsilon_voxels).mesh)
        sharp = timed("sharp edges", lambda: sharp_edges(mesh.vertices, mesh.faces, cfg.sharp_edge_angle_deg))
        timed("surface pyramid", lambda: surface_pyramid(closed, cfg.surface_sizes, rng,
                                                         max(cfg.sharp_edge_fraction, 0.1), sharp))
        timed("occupancy + labels", lambda: sample_occupancy(closed, cfg.num_vol, cfg.num_near, cfg.vol_bound,
                                                             cfg.near_sigmas, rng, cfg.inside_method))
        timed(f"render {cfg.render_views}x{cfg.render_resolution}^2", lambda: render_views(
            mesh, cfg.view_angles(), cfg.render_resolution, cfg.render_fov_deg, cfg.render_fit_margin,
            cfg.render_ambient, cfg.render_white_background, cfg.render_up_axis))
    n = min(count, len(objs))
    return {k: v / n for k, v in totals.items()}


def inside_comparison(obj: Path, cfg, num_points: int, naive_points: int) -> tuple[list[tuple], dict]:
    from mar3d.data.inside import embree_inside, naive_inside, winding_inside
    from mar3d.data.mesh_io import load_mesh
    from mar3d.data.watertight import make_watertight

    mesh = load_mesh(obj / "textured.obj", cfg.max_faces, cfg.max_file_bytes)
    closed = make_watertight(mesh.vertices, mesh.faces, cfg.watertight_resolution,
                             cfg.watertight_epsilon_voxels).mesh
    rng = np.random.default_rng(0)
    half = num_points // 2
    near = closed.sample(num_points - half) + rng.normal(scale=0.02, size=(num_points - half, 3))
    points = np.concatenate([rng.uniform(-1.05, 1.05, (half, 3)), near])
    results = {}
    for name, fn, n in [("fast winding number (libigl)", winding_inside, num_points),
                        ("embree ray parity (trimesh+embreex)", embree_inside, num_points),
                        ("pure-Python ray parity (trimesh ray_triangle)", naive_inside, naive_points)]:
        sub = points[rng.permutation(num_points)[:n]] if n < num_points else points
        t = time.perf_counter()
        labels = fn(closed, sub)
        seconds = time.perf_counter() - t
        results[name] = (n, seconds, seconds * num_points / n, labels, sub)
    base = results["pure-Python ray parity (trimesh ray_triangle)"][2]
    wn_labels = results["fast winding number (libigl)"][3]
    em_labels = results["embree ray parity (trimesh+embreex)"][3]
    naive_n, _, _, naive_labels, naive_pts = results["pure-Python ray parity (trimesh ray_triangle)"]
    naive_vs_wn = (naive_labels == winding_inside(closed, naive_pts)).mean()
    rows = []
    for name, (n, seconds, scaled, _, _) in results.items():
        rows.append((name, n, seconds, scaled, num_points / scaled, base / scaled))
    info = {"faces": len(closed.faces), "wn_vs_embree": float((wn_labels == em_labels).mean()),
            "naive_vs_wn": float(naive_vs_wn), "mesh": obj.name}
    return rows, info


def main(argv=None) -> None:
    args = parse_args(argv)
    from mar3d.config import load_config
    from mar3d.data import DataConfig

    cfg = load_config(DataConfig, args.config)
    if args.config is None:
        cfg.render_up_axis = "z"  # YCB scans are z-up
    objs = ycb_inputs(args.ycb, args.limit)
    print(f"# data throughput ({len(objs)} YCB objects, watertight {cfg.watertight_resolution}^3, "
          f"surface {list(cfg.surface_sizes)}, occupancy {cfg.num_vol}+{cfg.num_near}, "
          f"{cfg.render_views} views at {cfg.render_resolution}px, {os.cpu_count()} CPU cores)\n")
    if not args.skip_throughput:
        rows = throughput(objs, cfg, args.workers)
        print("| Ray workers | meshes | rows | errors | seconds | meshes/s |")
        print("|---|---|---|---|---|---|")
        for w, n, ok, bad, sec, rate in rows:
            print(f"| {w} | {n} | {ok} | {bad} | {sec:.1f} | {rate:.2f} |")
        base = rows[0][5]
        for w, *_, rate in rows[1:]:
            print(f"\nspeed-up {w} vs {rows[0][0]} worker(s): {rate / base:.2f}x")
        print("\n| stage (one core, mean of 3 meshes) | seconds |\n|---|---|")
        for k, v in stage_breakdown(objs, cfg).items():
            print(f"| {k} | {v:.3f} |")
        print()
    if not args.skip_inside:
        rows, info = inside_comparison(args.ycb / args.inside_mesh, cfg, args.inside_points, args.naive_points)
        print(f"## inside test on watertight {info['mesh']} ({info['faces']} faces), "
              f"{args.inside_points} query points (half uniform, half near-surface)\n")
        print(f"| method | points run | seconds | seconds @ {args.inside_points} | points/s | speed-up vs pure-Python |")
        print("|---|---|---|---|---|---|")
        for name, n, sec, scaled, rate, ratio in rows:
            note = "" if n == args.inside_points else " (scaled)"
            print(f"| {name} | {n} | {sec:.3f} | {scaled:.2f}{note} | {rate:,.0f} | {ratio:,.0f}x |")
        print(f"\nlabel agreement: winding vs embree {info['wn_vs_embree']:.5f}; "
              f"pure-Python vs winding {info['naive_vs_wn']:.5f}")


if __name__ == "__main__":
    main()
