"""Dense vs hierarchical (coarse-to-fine) vs hierarchical + adaptive KV selection mesh
extraction: decoder queries, time and agreement of the occupied voxels with the dense
grid, per shape and resolution. Prints a markdown table.

Occupancy fields benchmarked:
  * analytic SDFs (sphere, torus, thin plate) as logits -100 * sdf: exact geometry,
    negligible evaluation cost, so the time column shows the extraction overhead;
  * real YCB meshes through libigl's fast winding number (``ycb:<object>``), normalized
    to [-0.9, 0.9]^3: an expensive, non-learned field;
  * a real neural decoder: ``vae`` trains the tiny Pyramid VAE on one torus in-process
    (``--vae-steps``), or ``--checkpoint`` loads a trained VAE model folder (as written
    by mar3d training) and encodes ``--mesh``.

``--kv-top-k K ...`` adds a ``hierarchical+kv`` row per K for the VAE fields: the hierarchical
decoder whose query blocks (``--kv-block`` Morton-ordered points) attend only to their
top-K latent tokens (``mar3d.models.attention.KVSelect``). Speed-ups are ratios of the
process CPU time of the whole extraction (robust on a shared machine), wall seconds
are shown too; IoU is over the (R+1)^3 grid points, each method against the dense grid.

Examples:
  python benchmarks/extraction.py
  python benchmarks/extraction.py --resolutions 128 256 --shapes sphere ycb:025_mug vae
  python benchmarks/extraction.py --checkpoint runs/vae/checkpoint --mesh obj.glb --device cuda
  python benchmarks/extraction.py --shapes vae --vae-steps 300 --vae-tokens 512 \
      --resolutions 256 384 --kv-top-k 32
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
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


def train_tiny_vae(steps: int, device: str, seed: int = 0, hr_tokens: int | None = None):
    """Tiny Pyramid VAE fitted to one torus (fresh occupancy queries each step);
    ``hr_tokens`` overrides the config's HR latent token count (at most 2048)."""
    import torch
    import trimesh

    from mar3d.config import load_config
    from mar3d.models.vae import ShapeVAE, VAEConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mesh = trimesh.creation.torus(major_radius=0.55, minor_radius=0.25, major_sections=64, minor_sections=32)
    surfaces = [s.to(device) for s in surface_pyramid(mesh, (2048, 512, 128), seed)]
    inside = lambda p: -torus_sdf(0.55, 0.25)(p) > 0  # noqa: E731
    cfg = load_config(VAEConfig, "vae_tiny")
    if hr_tokens is not None:
        cfg = dataclasses.replace(cfg, hr_tokens=hr_tokens)
    model = ShapeVAE(cfg).to(device)
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


def cached_tiny_vae(args):
    """The in-process tiny VAE and its torus surfaces, trained once per ``--vae-cache``
    file (keyed by steps and token count: a cache made with other settings is retrained)."""
    import torch

    from mar3d.config import from_dict, to_dict
    from mar3d.models.vae import ShapeVAE, VAEConfig

    key = {"steps": args.vae_steps, "tokens": args.vae_tokens}
    if args.vae_cache and args.vae_cache.exists():
        # Plain data only (tensors, dicts, lists): nothing is unpickled.
        saved = torch.load(args.vae_cache, map_location=args.device, weights_only=True)
        if saved["key"] == key:
            model = ShapeVAE(from_dict(VAEConfig, saved["cfg"])).to(args.device)
            model.load_state_dict(saved["state"])
            print(f"# tiny VAE loaded from {args.vae_cache}", file=sys.stderr)
            return model.eval(), saved["surfaces"]
    t0 = time.perf_counter()
    model, surfaces, iou = train_tiny_vae(args.vae_steps, args.device, hr_tokens=args.vae_tokens)
    print(f"# tiny VAE trained on a torus: {args.vae_steps} steps in "
          f"{time.perf_counter() - t0:.1f} s, last-step query IoU {iou:.3f}", file=sys.stderr)
    if args.vae_cache:
        args.vae_cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "cfg": to_dict(model.cfg), "state": model.state_dict(), "surfaces": surfaces},
                   args.vae_cache)
    return model, surfaces


def vae_occupancy(model, surfaces, kv_selects):
    """The exact occupancy function and {method label: KV-selecting one} per ``kv_selects``."""
    import torch

    from mar3d.geometry import latent_occupancy_fn

    with torch.no_grad():
        kv = model.decode(model.encode(surfaces, level="hr", sample=False))
    return latent_occupancy_fn(model, kv), {f"hierarchical+kv (top {s.top_k})": latent_occupancy_fn(model, kv, kv_select=s)
                                            for s in kv_selects}


def checkpoint_occupancy(checkpoint: str, mesh_path: Path, device: str, kv_selects):
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
    return model.cfg.hr_tokens, vae_occupancy(model, surfaces, kv_selects)


def kv_selections(args):
    from mar3d.models.attention import KVSelect

    return [KVSelect(k, args.kv_block, args.kv_score_queries) for k in args.kv_top_k]


def occupancy_functions(args):
    """(name, exact occupancy fn, {label: KV-selecting fn}) per requested field."""
    for name in args.shapes:
        if name in ANALYTIC:
            yield name, ANALYTIC[name](), {}
        elif name.startswith("ycb:"):
            mesh = load_normalized_mesh(args.ycb_root / name[4:] / "textured.obj")
            yield f"{name} ({len(mesh.faces)} faces, winding number)", \
                winding_number_occupancy_fn(mesh.vertices, mesh.faces), {}
        elif name == "vae":
            if args.checkpoint:
                tokens, fns = checkpoint_occupancy(args.checkpoint, args.mesh, args.device, kv_selections(args))
                yield (f"VAE {args.checkpoint} on {args.mesh.name} ({tokens} tokens)", *fns)
            else:
                model, surfaces = cached_tiny_vae(args)
                yield (f"tiny VAE ({args.device}, torus, {model.cfg.hr_tokens} tokens)",
                       *vae_occupancy(model, surfaces, kv_selections(args)))
        else:
            raise SystemExit(f"unknown shape {name!r}: use {sorted(ANALYTIC)}, ycb:<object> or vae")


def timed_extraction(fn, resolution: int, args, method: str):
    """(ExtractionResult with the grid, process CPU seconds of the whole extraction)."""
    options = {} if method == "dense" else dict(coarse_resolution=args.coarse_resolution, band=args.band,
                                                dilate=args.dilate)
    cpu = time.process_time()
    result = extract_mesh(fn, resolution=resolution, method=method, batch_size=args.batch_size,
                          return_grid=True, **options)
    return result, time.process_time() - cpu


def compare(fn, kv_fns: dict, resolution: int, args) -> list[dict]:
    """One row per method; speed-up and IoU against the dense grid."""
    runs = [("dense", fn), ("hierarchical", fn), *kv_fns.items()]
    rows = []
    for label, f in runs:
        result, cpu = timed_extraction(f, resolution, args, label.split("+")[0])
        if not rows:
            dense_grid, dense_cpu = result.grid > 0, cpu
        occupied = result.grid > 0
        union = (dense_grid | occupied).sum()
        rows.append({"method": label, "queries": result.num_queries, "fraction": result.query_fraction,
                     "cpu_s": cpu, "wall_s": result.seconds, "speedup": dense_cpu / cpu,
                     "iou": 1.0 if union == 0 else (dense_grid & occupied).sum() / union,
                     "faces": len(result.mesh.faces)})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--shapes", nargs="+", default=["sphere", "torus", "thin_plate", "ycb:025_mug", "vae"],
                        help="sphere, torus, thin_plate, ycb:<object>, vae")
    parser.add_argument("--ycb-root", type=Path, default=DEFAULT_YCB)
    parser.add_argument("--batch-size", type=int, default=65536, help="decoder queries per call")
    parser.add_argument("--coarse-resolution", type=int, default=None, help="default: resolution / 4")
    parser.add_argument("--band", type=float, default=None, help="also refine cells with |logit| < band")
    parser.add_argument("--dilate", type=int, default=inspect.signature(extract_mesh).parameters["dilate"].default,
                        help="coarse cells refined around each sign change before the surface is followed")
    parser.add_argument("--vae-steps", type=int, default=400, help="training steps of the in-process tiny VAE")
    parser.add_argument("--vae-tokens", type=int, default=None,
                        help="HR latent tokens of the in-process tiny VAE (default: vae_tiny's 128)")
    parser.add_argument("--vae-cache", type=Path, default=None,
                        help="reuse the in-process tiny VAE saved here (trained and saved when missing)")
    parser.add_argument("--kv-top-k", type=int, nargs="*", default=[],
                        help="add a hierarchical+kv row per k: each query block attends to its top-k latent tokens")
    parser.add_argument("--kv-block", type=int, default=1024, help="queries per KV-selection block")
    parser.add_argument("--kv-score-queries", type=int, default=32,
                        help="queries per block that score the latent tokens")
    parser.add_argument("--checkpoint", default=None, help="trained VAE model folder or MLflow URI")
    parser.add_argument("--mesh", type=Path, default=DEFAULT_YCB / "025_mug" / "textured.obj",
                        help="mesh encoded by --checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)

    lines = ["| field | res | method | queries | of dense | CPU s | wall s | speed-up (CPU) "
             "| occupancy IoU vs dense | faces |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for name, fn, kv_fns in occupancy_functions(args):
        for res in args.resolutions:
            for r in compare(fn, kv_fns, res, args):
                line = (f"| {name} | {res} | {r['method']} | {r['queries']:,} | {r['fraction']:.1%} | "
                        f"{r['cpu_s']:.1f} | {r['wall_s']:.1f} | {r['speedup']:.1f}x | {r['iou']:.4f} | "
                        f"{r['faces']:,} |")
                lines.append(line)
                print(line, flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
