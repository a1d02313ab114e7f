"""Dense vs hierarchical (coarse-to-fine) mesh extraction: decoder queries, wall time and
agreement of the occupied voxels, per shape and resolution. Prints a markdown table.

Occupancy fields benchmarked:
  * analytic SDFs (sphere, torus, thin plate) as logits -100 * sdf: exact geometry,
    negligible evaluation cost, so the time column shows the extraction overhead;
  * real YCB meshes through libigl's fast winding number (``ycb:<object>``), normalized
    to [-0.9, 0.9]^3: an expensive, non-learned field;
  * a real neural decoder: ``vae`` trains the tiny Pyramid VAE on one torus in-process
    (``--vae-steps``), or ``--checkpoint`` loads a trained VAE model folder (as written
    by mar3d training) and encodes ``--mesh``.

Examples:
  python benchmarks/extraction.py
  python benchmarks/extraction.py --resolutions 128 256 --shapes sphere ycb:025_mug vae
  python benchmarks/extraction.py --checkpoint runs/vae/checkpoint --mesh obj.glb --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mar3d.geometry import extract_mesh  # noqa: E402
from mar3d.geometry.analytic import (box_sdf, sdf_occupancy_fn, sphere_sdf, torus_sdf,  # noqa: E402
                                     winding_number_occupancy_fn)

DEFAULT_YCB = Path(os.environ.get("MAR3D_YCB", REPO.parent / "shared" / "datasets" / "ycb"))
ANALYTIC = {
    "sphere": lambda: sdf_occupancy_fn(sphere_sdf(0.8)),
    "torus": lambda: sdf_occupancy_fn(torus_sdf(0.6, 0.2)),
    "thin_plate": lambda: sdf_occupancy_fn(box_sdf((0.8, 0.8, 0.04))),
}


def load_normalized_mesh(path: Path, extent: float = 0.9):
    import trimesh

    mesh = trimesh.load(path, force="mesh", process=False)
    lo, hi = mesh.bounds
    mesh.apply_translation(-(lo + hi) / 2)
    mesh.apply_scale(2 * extent / (hi - lo).max())
    return mesh


def surface_pyramid(mesh, sizes, seed: int = 0):
    import torch
    import trimesh

    levels = []
    for k, n in enumerate(sizes):
        p, fi = trimesh.sample.sample_surface(mesh, n, seed=seed + k)
        levels.append(torch.tensor(np.concatenate([p, mesh.face_normals[fi]], 1), dtype=torch.float32)[None])
    return levels


def train_tiny_vae(steps: int, device: str, seed: int = 0):
    """Tiny Pyramid VAE fitted to one torus (fresh occupancy queries each step)."""
    import torch
    import trimesh

    from mar3d.config import load_config
    from mar3d.models.vae import ShapeVAE, VAEConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mesh = trimesh.creation.torus(major_radius=0.55, minor_radius=0.25, major_sections=64, minor_sections=32)
    surfaces = [s.to(device) for s in surface_pyramid(mesh, (2048, 512, 128), seed)]
    inside = lambda p: -torus_sdf(0.55, 0.25)(p) > 0  # noqa: E731
    model = ShapeVAE(load_config(VAEConfig, "vae_tiny")).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        near = trimesh.sample.sample_surface(mesh, 1024, seed=seed + 1000 + step)[0] + rng.normal(0, 0.02, (1024, 3))
        pts = np.concatenate([rng.uniform(-1, 1, (3072, 3)), near]).astype(np.float32)
        batch = {f"surface_{k}": s for k, s in enumerate(surfaces)}
        batch["occ_points"] = torch.tensor(pts, device=device)[None]
        batch["occ_labels"] = torch.tensor(inside(pts), dtype=torch.float32, device=device)[None]
        out = model(batch, level="hr" if step % 2 == 0 else "lr")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        schedule.step()
    model.eval()
    return model, surfaces, float(out["iou"])


def vae_occupancy(model, surfaces):
    import torch

    from mar3d.geometry import latent_occupancy_fn

    with torch.no_grad():
        kv = model.decode(model.encode(surfaces, level="hr", sample=False))
    return latent_occupancy_fn(model, kv)


def checkpoint_occupancy(checkpoint: str, mesh_path: Path, device: str):
    from mar3d.config import from_dict
    from mar3d.models.vae import ShapeVAE, VAEConfig
    from mar3d.registry import resolve_model_dir
    from mar3d.weights import load_model_dir

    state, doc = load_model_dir(resolve_model_dir(checkpoint), kind="vae")
    model = ShapeVAE(from_dict(VAEConfig, doc["model"]))
    model.load_state_dict(state)
    model.eval().to(device)
    sizes = [16384 // 4 ** k for k in range(model.cfg.num_levels)]
    surfaces = [s.to(device) for s in surface_pyramid(load_normalized_mesh(mesh_path, 1.0), sizes)]
    return vae_occupancy(model, surfaces)


def occupancy_functions(args):
    for name in args.shapes:
        if name in ANALYTIC:
            yield name, ANALYTIC[name]()
        elif name.startswith("ycb:"):
            mesh = load_normalized_mesh(args.ycb_root / name[4:] / "textured.obj")
            yield f"{name} ({len(mesh.faces)} faces, winding number)", \
                winding_number_occupancy_fn(mesh.vertices, mesh.faces)
        elif name == "vae":
            if args.checkpoint:
                yield f"VAE {args.checkpoint} on {args.mesh.name}", \
                    checkpoint_occupancy(args.checkpoint, args.mesh, args.device)
            else:
                t0 = time.perf_counter()
                model, surfaces, iou = train_tiny_vae(args.vae_steps, args.device)
                print(f"# tiny VAE trained on a torus: {args.vae_steps} steps in "
                      f"{time.perf_counter() - t0:.1f} s, last-step query IoU {iou:.3f}", file=sys.stderr)
                yield f"tiny VAE ({args.device}, torus)", vae_occupancy(model, surfaces)
        else:
            raise SystemExit(f"unknown shape {name!r}: use {sorted(ANALYTIC)}, ycb:<object> or vae")


def compare(fn, resolution: int, args) -> dict:
    dense = extract_mesh(fn, resolution=resolution, method="dense", batch_size=args.batch_size, return_grid=True)
    fast = extract_mesh(fn, resolution=resolution, method="hierarchical", batch_size=args.batch_size,
                        coarse_resolution=args.coarse_resolution, band=args.band, return_grid=True)
    a, b = dense.grid > 0, fast.grid > 0
    union = (a | b).sum()
    return {
        "dense_q": dense.num_queries, "fast_q": fast.num_queries, "fraction": fast.query_fraction,
        "dense_s": dense.seconds, "fast_s": fast.seconds,
        "iou": 1.0 if union == 0 else (a & b).sum() / union,
        "faces": (len(dense.mesh.faces), len(fast.mesh.faces)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--shapes", nargs="+", default=["sphere", "torus", "thin_plate", "ycb:025_mug", "vae"],
                        help="sphere, torus, thin_plate, ycb:<object>, vae")
    parser.add_argument("--ycb-root", type=Path, default=DEFAULT_YCB)
    parser.add_argument("--batch-size", type=int, default=65536, help="decoder queries per call")
    parser.add_argument("--coarse-resolution", type=int, default=None, help="default: resolution / 4")
    parser.add_argument("--band", type=float, default=None, help="also refine cells with |logit| < band")
    parser.add_argument("--vae-steps", type=int, default=400, help="training steps of the in-process tiny VAE")
    parser.add_argument("--checkpoint", default=None, help="trained VAE model folder or MLflow URI")
    parser.add_argument("--mesh", type=Path, default=DEFAULT_YCB / "025_mug" / "textured.obj",
                        help="mesh encoded by --checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    lines = ["| field | res | dense queries | hier. queries | hier./dense | dense s | hier. s | speed-up "
             "| occupancy IoU | faces dense / hier. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, fn in occupancy_functions(args):
        for res in args.resolutions:
            r = compare(fn, res, args)
            line = (f"| {name} | {res} | {r['dense_q']:,} | {r['fast_q']:,} | {r['fraction']:.1%} | "
                    f"{r['dense_s']:.2f} | {r['fast_s']:.2f} | {r['dense_s'] / r['fast_s']:.1f}x | "
                    f"{r['iou']:.4f} | {r['faces'][0]:,} / {r['faces'][1]:,} |")
            lines.append(line)
            print(line, flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
