"""Batch-generation throughput: shapes/s of batched sampling at batch 1, 4, 16 (one
pipeline, in process) and of `mar3d.generate.batch_generate` with 1 vs 2 actors, on CPU and
on GPU when CUDA is available (rows say "skipped" otherwise).

Batch sizes (--batch-sizes): the same N images go through `MAR3DPipeline(..., output_type="latent")`
in chunks of each batch size ("sampling": condition + MAR-LR + MAR-HR), then through
per-item decoding and mesh extraction ("end-to-end" adds that). shapes/s are N over the
process CPU seconds on CPU (--threads torch threads, default 1: per-core throughput,
robust to other load on the machine) and over wall seconds on GPU; ratios are to the
first batch size, measured in the same run (best of --repeats interleaved runs). The
"max |diff|" column checks batch invariance: the largest token difference between an
item sampled in that batch size and in batches of the first size.

Every configuration generates the same N images into a fresh output folder. "job" numbers
time the whole job as a user sees it (listing, actor start-up with one model load per
actor, generation, mesh writing, results.parquet), after Ray itself has started;
"steady" numbers count the shapes finished after the first one over the time since it,
so they leave out the start-up. Speed-ups are relative to the first --actors count on
the same device, measured in the same run (best of --repeats interleaved runs).

Without --model a tiny randomly initialised release is written to a temporary folder
and run with fast settings (4 AR steps, 5 diffusion steps, 32^3 grid): it measures the
job machinery and scaling, not a real model's cost. Pass --model (a release folder or
models:/NAME@ALIAS with --tracking-uri) for real numbers.

    python benchmarks/batch_generate.py                    # tiny release, 16 images
    python benchmarks/batch_generate.py --model models:/mar3d@champion --tracking-uri http://... \\
        --num-images 64 --resolution 256
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY_DEFAULTS = {"num_inference_steps": 4, "diffusion_steps": 5, "resolution": 32}


def pipeline_config(settings: dict):
    """A PipelineConfig of flat ``settings``: sampling names go to its ``sampling`` block."""
    from mar3d.inference import PipelineConfig
    from mar3d.models.mar import SAMPLING_FIELDS, SamplingConfig

    sampling = {k: v for k, v in settings.items() if k in SAMPLING_FIELDS}
    rest = {k: v for k, v in settings.items() if k not in SAMPLING_FIELDS}
    return PipelineConfig(sampling=SamplingConfig(**sampling), **rest)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="release folder or models:/ URI (default: tiny random release)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for models:/ URIs")
    p.add_argument("--num-images", type=int, default=16, help="images to generate per configuration")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to time")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4, help="actors' batch_size (items per model call)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16],
                   help="batch sizes of the in-process sampling table")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process table (CPU)")
    p.add_argument("--skip-actors", action="store_true", help="only the in-process batch-size table")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="AR steps (default: model's; tiny: 4)")
    p.add_argument("--diffusion-steps", type=int, default=None, help="(default: model's; tiny: 5)")
    p.add_argument("--resolution", type=int, default=None, help="marching-cubes grid (default 128; tiny: 32)")
    p.add_argument("--no-hr", action="store_true", help="LR tokens only")
    p.add_argument("--repeats", type=int, default=1,
                   help="time each configuration this many times, interleaved, and keep the best "
                        "(damps noise from other load on the machine)")
    p.add_argument("--skip-gpu", action="store_true")
    return p.parse_args(argv)


def make_images(folder: Path, n: int, size: int) -> Path:
    """Synthetic condition images: a coloured disc on white (RGBA), different per index."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        rng = np.random.default_rng(i)
        cx, cy = rng.uniform(0.35, 0.65, 2) * size
        r = rng.uniform(0.15, 0.35) * size
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        img = np.full((size, size, 4), 255, np.uint8)
        img[disc, :3] = rng.integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:04d}.png")
    return folder


def run_one(images: Path, model: str, tracking_uri: str | None, gen_kwargs: dict, actors: int,
            gpu: bool, args, workdir: Path) -> dict:
    from mar3d.generate import GenerateConfig, batch_generate

    cfg = GenerateConfig(pipeline=pipeline_config(gen_kwargs), num_actors=actors,
                         cpus_per_actor=args.cpus_per_actor, batch_size=args.batch_size,
                         use_gpu=gpu, gpus_per_actor=(min(1.0, 1.0 / actors) if gpu else 0.0))
    out = Path(tempfile.mkdtemp(prefix=f"out-{'gpu' if gpu else 'cpu'}-{actors}-", dir=workdir))
    result = batch_generate(str(images), model, str(out), cfg, tracking_uri=tracking_uri, progress=False)
    if result.failed or result.succeeded != args.num_images:
        raise SystemExit(f"benchmark run failed: {result.summary()}")
    import pyarrow.parquet as pq

    table = pq.read_table(out / "results.parquet", columns=["seconds", "finished_at"])
    done = sorted(datetime.fromisoformat(t).timestamp() for t in table.column("finished_at").to_pylist())
    # Steady state: shapes finished after the first one, over the time since it (no start-up).
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else float("nan")
    return {"seconds": result.seconds, "sps": result.shapes_per_second, "steady": steady,
            "item": float(np.mean(table.column("seconds").to_numpy()))}


def _clock(device: str) -> float:
    import time

    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_batch_size(pipe, images: list, batch: int) -> dict:
    """Sampling, then per-item decoding + extraction, of ``images`` in chunks of ``batch``;
    item i has seed i whatever its chunk."""
    import torch

    device = pipe.device.type
    t0 = _clock(device)
    chunks = [range(i, min(i + batch, len(images))) for i in range(0, len(images), batch)]
    tokens = torch.cat([pipe([images[j] for j in c], seed=list(c), output_type="latent").latents
                        for c in chunks])
    t1 = _clock(device)
    faces = [len(pipe.decode(t).mesh.faces) for t in tokens.split(1)]
    t2 = _clock(device)
    return {"sample": t1 - t0, "e2e": t2 - t0, "tokens": tokens.cpu(), "faces": faces}


def batch_size_table(model: str, tracking_uri: str | None, gen_kwargs: dict, images: Path, args) -> None:
    import torch

    from mar3d.inference import MAR3DPipeline

    paths = sorted(images.iterdir())
    print("| device | batch | images | sampling s | shapes/s (sampling) | speed-up | end-to-end s | "
          "shapes/s (end-to-end) | speed-up | max abs diff vs first |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for device in ("cpu", "cuda"):
        if device == "cuda" and (args.skip_gpu or not torch.cuda.is_available()):
            why = "--skip-gpu" if args.skip_gpu else "no CUDA"
            for b in args.batch_sizes:
                print(f"| gpu | {b} | {len(paths)} | skipped: {why} | | | | | | |")
            continue
        if device == "cpu":
            torch.set_num_threads(args.threads)
        pipe = MAR3DPipeline.from_pretrained(model, config=pipeline_config(gen_kwargs), device=device,
                                             tracking_uri=tracking_uri)
        time_batch_size(pipe, paths[:1], 1)  # warm-up: allocator, kernels, lazy imports
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for b in args.batch_sizes:
                r = time_batch_size(pipe, paths, b)
                if b not in best or r["e2e"] < best[b]["e2e"]:
                    best[b] = r
        base = best[args.batch_sizes[0]]
        for b in args.batch_sizes:
            r = best[b]
            diff = (r["tokens"] - base["tokens"]).abs().max().item()
            print(f"| {'gpu' if device == 'cuda' else 'cpu'} | {b} | {len(paths)} | {r['sample']:.2f} | "
                  f"{len(paths) / r['sample']:.2f} | {base['sample'] / r['sample']:.2f}x | {r['e2e']:.2f} | "
                  f"{len(paths) / r['e2e']:.2f} | {base['e2e'] / r['e2e']:.2f}x | {diff:.1e} |", flush=True)
    print()


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    import ray
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="mar3d-bench-gen-"))
    if args.model is None:
        from _tiny_release import write_tiny_release

        model = str(write_tiny_release(workdir / "tiny-release"))
        defaults = TINY_DEFAULTS
    else:
        model, defaults = args.model, {}
    gen_kwargs = {k: v for k, v in {"num_inference_steps": args.num_inference_steps,
                                    "diffusion_steps": args.diffusion_steps,
                                    "resolution": args.resolution}.items() if v is not None}
    gen_kwargs = {**defaults, **gen_kwargs, "use_hr": not args.no_hr}
    images = make_images(workdir / "images", args.num_images, args.image_size)

    print(f"model: {'tiny random release' if args.model is None else model}; settings {gen_kwargs}; "
          f"{args.num_images} images {args.image_size}px; {os.cpu_count()} CPU cores; "
          f"{args.threads} torch thread(s) in process; load average before: {os.getloadavg()[0]:.1f}\n")
    batch_size_table(model, args.tracking_uri, gen_kwargs, images, args)
    if args.skip_actors:
        shutil.rmtree(workdir, ignore_errors=True)
        return 0
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    has_cuda = torch.cuda.is_available() and ray.cluster_resources().get("GPU", 0) > 0
    print(f"model: {'tiny random release' if args.model is None else model}; settings {gen_kwargs}; "
          f"{args.num_images} images {args.image_size}px; {os.cpu_count()} CPU cores; "
          f"cpus/actor {args.cpus_per_actor}; batch {args.batch_size}; "
          f"GPU: {torch.cuda.get_device_name(0) if has_cuda else 'none'}; "
          f"load average before: {os.getloadavg()[0]:.1f}\n")
    print("| device | actors | images | job seconds | shapes/s (job) | speed-up | "
          "shapes/s (steady) | steady speed-up | mean s/item |")
    print("|---|---|---|---|---|---|---|---|---|")
    for device in ("cpu", "gpu"):
        if device == "gpu" and (args.skip_gpu or not has_cuda):
            why = "--skip-gpu" if args.skip_gpu else "no CUDA"
            for a in args.actors:
                print(f"| gpu | {a} | {args.num_images} | skipped: {why} | | | | | |")
            continue
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for a in args.actors:
                r = run_one(images, model, args.tracking_uri, gen_kwargs, a, device == "gpu", args, workdir)
                if a not in best or r["seconds"] < best[a]["seconds"]:
                    best[a] = r
        base = best[args.actors[0]]
        for a in args.actors:
            r = best[a]
            print(f"| {device} | {a} | {args.num_images} | {r['seconds']:.1f} | {r['sps']:.3f} | "
                  f"{r['sps'] / base['sps']:.2f}x | {r['steady']:.3f} | {r['steady'] / base['steady']:.2f}x | "
                  f"{r['item']:.3f} |", flush=True)
    ray.shutdown()
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
