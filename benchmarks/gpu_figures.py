"""GPU figures of MAR-LR training and batched generation, in one short run.

Three phases per size (``--sizes``: ``tiny`` and/or ``paper``, the shipped presets), each
in a child process with its own time budget, so that a phase that hangs or runs long is
killed and the others still report; they run in the order train, flops, generate:

* ``flops``: model FLOPs of one MAR-LR training step per sample, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) on
  ``--flop-steps`` steps of benchmarks/fps.py's ``mar_step`` at batch ``--flop-batch``:
  frozen-VAE target encoding + frozen CLIP/DINOv2 forward + MAR forward and backward.
  FLOPs are linear in the batch; the mean over steps averages the random mask ratio.
* ``train``: the production path, ``mar3d.train.run_training`` (Ray Train TorchTrainer,
  DeepSpeed ZeRO-2; on cuda nccl + bf16 autocast, on cpu gloo + fp32) of the
  ``train_lr_{size}`` preset, one worker per GPU, on a dataset the data job
  (``prepare_dataset``) makes from procedural meshes, with a randomly initialised frozen
  VAE of the ``vae_{size}`` preset (throughput does not depend on the weights or the
  shapes). ``--warmup`` steps, then ``--steps`` timed steps: the training loop's last
  log window (``log_every = --steps``) gives samples/s, latent tokens/s, compute and data
  ms per step and ``train/gpu_peak_gib`` (rank 0's ``torch.cuda.max_memory_allocated``).
  They are read back from the run's MLflow store, where rank 0 logs them before the final
  checkpoint is written, so a phase killed while checkpointing still reports them.
  MFU = FLOPs/sample x samples/s / (GPUs x ``--peak-tflops``; default 989, the H200's
  dense bf16 datasheet figure; KINDS.md measured ~790 for a plain 8192^3 bf16 matmul).
* ``generate``: ``MAR3DPipeline`` on a random release of the ``{vae,mar}_{size}`` presets
  (the cascade LR + HR at the presets' sampling settings; tiny: batch_generate.py's fast
  settings), timed with benchmarks/batch_generate.py's ``time_batch_size`` at each
  ``--gen-batch-sizes`` (as many images as the batch), after one warm-up image.

Prints markdown tables as results arrive and writes ``figures.json`` + ``figures.md`` to
``--out`` (default ``$OUT``, else outputs/gpu_figures), rewritten after every phase.

CPU smoke test (this repository's machines: gloo, fp32, tiny)::

    python benchmarks/gpu_figures.py --device cpu --sizes tiny --steps 3

GPU device machine (one H200, Python 3.12 with torch + CUDA, no network): the packages
it lacks travel as ``.gpu/site.tar.xz``, built here first with
``bash benchmarks/gpu_bundle.sh`` (~60 MiB; the device carries at most 64 MiB with the
repository). Then one ``run`` with ``carry: [".gpu"]`` and ``timeout_s: 560``::

    set -o pipefail; mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site &&
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
    python3 benchmarks/gpu_figures.py --device cuda --sizes paper --out $OUT 2>&1 | tee $OUT/log.txt

The default budgets (train 240 s, flops 80 s, generate 150 s) keep that near 8 minutes;
15 minutes of device time allow one such call (a machine takes 1-2 minutes to start).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
PHASES = ("train", "flops", "generate")  # the order they run in: training first
SIZES = ("tiny", "paper")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=["paper"])
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed training steps first (default --steps; rounded up to a multiple of it)")
    p.add_argument("--batch-size", type=int, default=None, help="per worker (default: the preset's)")
    p.add_argument("--gpus", type=int, default=1, help="training workers on cuda (one GPU each)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default 989 on cuda, none on cpu)")
    p.add_argument("--flop-batch", type=int, default=2)
    p.add_argument("--flop-steps", type=int, default=3)
    p.add_argument("--gen-batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--budget-flops", type=float, default=80.0, help="seconds")
    p.add_argument("--budget-train", type=float, default=240.0, help="seconds")
    p.add_argument("--budget-generate", type=float, default=150.0, help="seconds")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "outputs" / "gpu_figures"))
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--phase", choices=PHASES, default=None, help=argparse.SUPPRESS)  # child
    return p.parse_args(argv)


# ------------------------------------------------------------------------ shared helpers
def _device_info(device: str) -> dict:
    import torch

    if device == "cuda":
        return {"device_name": torch.cuda.get_device_name(0), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return {"device_name": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__}


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def _warmup_steps(args) -> int:
    warmup = args.steps if args.warmup is None else args.warmup
    return -(-warmup // args.steps) * args.steps  # last log window = the timed steps


def _vae_folder(size: str, work: Path) -> Path:
    sys.path.insert(0, str(HERE))
    from fps import frozen_vae_folder

    return frozen_vae_folder(size, work / "vae")


# ---------------------------------------------------------------------------- phases
def phase_flops(args, size: str, work: Path, result: Path) -> None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(HERE))
    from fps import mar_step

    device = torch.device(args.device)
    step, name = mar_step(size, "lr", args.flop_batch, True, device, work / "vae")
    with FlopCounterMode(display=False) as counter:
        for i in range(args.flop_steps):
            torch.manual_seed(i)
            step()
    per_sample = counter.get_total_flops() / (args.flop_steps * args.flop_batch)
    _write_json(result, {"what": name, "flops_per_sample": per_sample, **_device_info(args.device)})


def write_meshes(folder: Path, count: int) -> Path:
    """``count`` different closed primitives (sphere, box, cylinder, capsule, torus)."""
    import numpy as np
    import trimesh

    makers = (lambda r: trimesh.creation.icosphere(subdivisions=3, radius=r.uniform(0.5, 1.0)),
              lambda r: trimesh.creation.box(extents=r.uniform(0.3, 1.0, 3)),
              lambda r: trimesh.creation.cylinder(radius=r.uniform(0.2, 0.5), height=r.uniform(0.5, 1.0)),
              lambda r: trimesh.creation.capsule(height=r.uniform(0.3, 0.8), radius=r.uniform(0.1, 0.4)),
              lambda r: trimesh.creation.torus(major_radius=r.uniform(0.4, 0.6), minor_radius=r.uniform(0.1, 0.2)))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        makers[i % len(makers)](np.random.default_rng(i)).export(folder / f"shape_{i:03d}.glb")
    return folder


def make_dataset(cfg, work: Path) -> Path:
    """Shards from the data job with the training config's surface sizes and image size;
    occupancy points and views kept few (MAR-LR reads neither beyond one view)."""
    from mar3d.data import DataConfig, prepare_dataset

    count = max(8, cfg.batch_size * cfg.num_workers)
    data_cfg = DataConfig(surface_sizes=tuple(cfg.surface_sizes), watertight_resolution=64,
                          num_vol=1024, num_near=1024, render_views=2,
                          render_resolution=cfg.condition.image_size, shard_size=64,
                          num_workers=max(1, min(count, (os.cpu_count() or 2) - 1)), cpus_per_task=1.0)
    out = work / "data"
    result = prepare_dataset(write_meshes(work / "meshes", count), out, data_cfg, progress=False)
    if result.total_errors or result.total_rows < count:
        raise RuntimeError(f"data job: {result.summary()}")
    return out


def train_config(args, size: str, work: Path):
    from mar3d.train import load_train_config

    cuda = args.device == "cuda"
    warmup = _warmup_steps(args)
    overrides = [f"storage_path={work / 'train'}", f"run_name=figures-{size}", "mlflow_uri=",
                 f"vae_model_uri={_vae_folder(size, work)}", "latent_norm=false",
                 f"num_workers={args.gpus if cuda else 1}", f"use_gpu={str(cuda).lower()}",
                 "precision=auto", "backend=auto", "zero_stage=2", "split=all", "max_failures=0",
                 f"steps={warmup + args.steps}", f"log_every={args.steps}",
                 f"checkpoint_every={warmup + args.steps}", "eval_every=0", "num_eval_samples=1",
                 "warmup_steps=0"]
    if not cuda:
        overrides.append("cpus_per_worker=1")
    if args.batch_size:
        overrides.append(f"batch_size={args.batch_size}")
    return load_train_config("lr", f"train_lr_{size}", overrides)


def phase_train(args, size: str, work: Path, result: Path) -> None:
    import ray

    from mar3d.train import run_training

    cfg = train_config(args, size, work)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True)
    start = time.monotonic()
    cfg.data = str(make_dataset(cfg, work))
    doc = {"data_s": time.monotonic() - start, "batch_size": cfg.batch_size, "workers": cfg.num_workers,
           "precision": cfg.resolved_precision(), "backend": cfg.resolved_backend(),
           "zero_stage": cfg.zero_stage, "timed_steps": args.steps, "warmup_steps": _warmup_steps(args),
           **_device_info(args.device)}
    _write_json(result, doc)
    out = run_training(cfg)
    _write_json(result, {**doc, "train_s": out.seconds})
    ray.shutdown()


def phase_generate(args, size: str, work: Path, result: Path) -> None:
    import torch

    sys.path[:0] = [str(HERE), str(REPO / "tests")]
    from _tiny_release import write_random_release
    from batch_generate import TINY_DEFAULTS, make_images, pipeline_config, time_batch_size

    from mar3d.config import flatten
    from mar3d.inference import MAR3DPipeline

    if args.device == "cpu":
        torch.set_num_threads(1)  # per-core figures; other jobs share the machine
    cuda = args.device == "cuda"
    release = write_random_release(work / f"release_{size}", size)
    gen = pipeline_config(TINY_DEFAULTS if size == "tiny" else {})
    pipe = MAR3DPipeline.from_pretrained(str(release), config=gen, device=args.device)
    images = sorted(make_images(work / "images", max(args.gen_batch_sizes), 224).iterdir())
    time_batch_size(pipe, images[:1], 1)  # warm-up: allocator, kernels, lazy imports
    doc = {"settings": {k: v for k, v in flatten(gen).items() if v is not None}, "rows": [],
           **_device_info(args.device)}
    for batch in args.gen_batch_sizes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        n = batch
        r = time_batch_size(pipe, images[:n], batch)
        doc["rows"].append({"batch": batch, "images": n, "sampling_s": r["sample"], "e2e_s": r["e2e"],
                            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None})
        _write_json(result, doc)
        print(f"generate {size} batch {batch}: {n / r['sample']:.3f} shapes/s sampling, "
              f"{n / r['e2e']:.3f} end-to-end", flush=True)


# ------------------------------------------------------------------------ orchestration
def run_child(args, phase: str, size: str, work: Path, budget: float) -> str:
    """Run one phase in its own process group; kill the group at the budget."""
    argv = [sys.executable, __file__, "--phase", phase, "--sizes", size, "--device", args.device,
            "--steps", str(args.steps), "--warmup", str(_warmup_steps(args)), "--gpus", str(args.gpus),
            "--flop-batch", str(args.flop_batch), "--flop-steps", str(args.flop_steps),
            "--work", str(work), "--gen-batch-sizes", *map(str, args.gen_batch_sizes)]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        status = f"stopped at its {budget:.0f} s budget"
    return f"{status} after {time.monotonic() - start:.0f} s"


def train_metrics(work: Path, size: str) -> dict:
    """The training run's logged metrics (last value of each) and the step they end at."""
    from mar3d import tracking
    from mar3d.train.api import RUN_STATE

    state_file = work / "train" / f"figures-{size}" / RUN_STATE
    if not state_file.is_file():
        return {}
    state = json.loads(state_file.read_text())
    client = tracking.client(state["tracking_uri"])
    metrics = dict(client.get_run(state["run_id"]).data.metrics)
    history = client.get_metric_history(state["run_id"], "train/samples_per_s")
    if history:
        metrics["window_end_step"] = max(m.step for m in history)
    return metrics


def _fmt(value, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def train_row(size: str, r: dict, peak_tflops: float | None) -> str:
    t, m, f = r.get("train", {}), r.get("train_metrics", {}), r.get("flops", {})
    sps, fps_ = m.get("train/samples_per_s"), f.get("flops_per_sample")
    achieved = sps * fps_ / 1e12 if sps and fps_ else None
    mfu = achieved / (peak_tflops * t.get("workers", 1)) if achieved and peak_tflops else None
    window = (f"{m['window_end_step'] - t.get('timed_steps', 0)}-{m['window_end_step']}"
              if "window_end_step" in m else "")
    return (f"| {size} | {t.get('device_name', '')} | {t.get('workers', '')} | {t.get('batch_size', '')} | "
            f"{t.get('precision', '')}/{t.get('backend', '')}/ZeRO-{t.get('zero_stage', '')} | {window} | "
            f"{_fmt(sps, '.2f')} | {_fmt(m.get('train/tokens_per_s'), '.0f')} | "
            f"{_fmt(m.get('train/compute_ms'))} | {_fmt(m.get('train/data_ms'))} | "
            f"{_fmt(fps_ / 1e9 if fps_ else None)} | {_fmt(achieved, '.2f')} | "
            f"{_fmt(100 * mfu if mfu else None)}{'%' if mfu else ''} | {_fmt(m.get('train/gpu_peak_gib'))} |")


def generate_rows(size: str, r: dict) -> list[str]:
    g = r.get("generate", {})
    return [f"| {size} | {g.get('device_name', '')} | {row['batch']} | {row['images']} | "
            f"{row['sampling_s']:.2f} | {row['images'] / row['sampling_s']:.3f} | {row['e2e_s']:.2f} | "
            f"{row['images'] / row['e2e_s']:.3f} | {_fmt(row['peak_gib'])} |" for row in g.get("rows", [])]


def report(results: dict, args, peak_tflops: float | None) -> str:
    lines = [f"GPU figures ({args.device}; steps {args.steps} timed after {_warmup_steps(args)}; "
             f"MFU peak {peak_tflops or 'n/a'} TFLOP/s per device)", "",
             "| size | device | GPUs | batch/GPU | precision/backend/ZeRO | timed steps | samples/s | "
             "tokens/s | compute ms/step | data ms/step | GFLOP/sample | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [train_row(size, r, peak_tflops) for size, r in results.items()]
    lines += ["", "| size | device | batch | images | sampling s | shapes/s (sampling) | end-to-end s | "
                  "shapes/s (end-to-end) | peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for size, r in results.items():
        lines += generate_rows(size, r)
    lines += ["", "phases: " + "; ".join(f"{size} {p}: {s}" for size, r in results.items()
                                         for p, s in r.get("status", {}).items())]
    return "\n".join(lines)


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="mar3d-gpu-figures-"))
    work.mkdir(parents=True, exist_ok=True)
    peak = args.peak_tflops or (989.0 if args.device == "cuda" else None)
    budgets = {"flops": args.budget_flops, "train": args.budget_train, "generate": args.budget_generate}
    results: dict[str, dict] = {}
    for size in args.sizes:
        r = results.setdefault(size, {"status": {}})
        for phase in args.phases:
            print(f"== {size} {phase} (budget {budgets[phase]:.0f} s)", flush=True)
            r["status"][phase] = run_child(args, phase, size, work, budgets[phase])
            path = work / f"{phase}_{size}.json"
            if path.is_file():
                r[phase] = json.loads(path.read_text())
            if phase == "train":
                r["train_metrics"] = train_metrics(work, size)
            table = report(results, args, peak)
            _write_json(out / "figures.json", {"args": vars(args), "peak_tflops": peak, "results": results})
            (out / "figures.md").write_text(table + "\n")
            print(table, flush=True)
    return 0 if all(s.startswith("ok") for r in results.values() for s in r["status"].values()) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.phase is None:
        return orchestrate(args)
    phase = {"flops": phase_flops, "train": phase_train, "generate": phase_generate}[args.phase]
    size = args.sizes[0]
    work = Path(args.work)
    phase(args, size, work, work / f"{args.phase}_{size}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
