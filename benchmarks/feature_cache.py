"""MAR-LR training samples/s with and without the feature/latent cache, at the tiny config
and a mid-size one, through the production path (`run_training`: Ray Data stream, Ray
Train worker, DeepSpeed, MLflow).

For each config a random-init frozen VAE and image encoder are written to a temporary
folder (no download), then MAR-LR trains ``--steps`` steps twice: computing encoder
features and VAE latents every step ("uncached"), and from a cache that
`build_feature_cache` made first ("cached", its build time reported separately).
samples/s is the run's last ``train/samples_per_s`` window (the second half of the
steps), so Ray/worker start-up and the first stream pass stay out of it; latent_ms,
data_ms and compute_ms are that window's per-step means. The ratio is cached over
uncached samples/s of the same config in the same run.

Wall-clock rates on a shared machine move with its load, so a second table times the
same training step (MARStage.loss + backward + AdamW step, one torch thread, batches
made beforehand: the step's own cost, no data loading) in this process in **CPU
seconds**, cached and uncached batches interleaved, best of ``--repeats``.

* ``tiny``: the `train_lr_tiny` preset (tiny CLIP/DINOv2 at 224 px, 64-wide MAR) on the
  tiny VAE;
* ``mid``: random-init ViT-B-16 CLIP + vit_base_patch14_dinov2 at 224 px, a 256-wide
  MAR (4+4 layers) and a 256-wide VAE encoder.

    python benchmarks/feature_cache.py --data outputs/data --steps 40
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {
    "tiny": {"vae": [], "train": []},
    "mid": {
        "vae": ["width=256", "heads=8", "enc_layers=2"],
        "train": ["condition.tiny=false", "condition.clip_model=ViT-B-16", "condition.clip_pretrained=null",
                  "condition.dino_model=vit_base_patch14_dinov2", "condition.dino_pretrained=null",
                  "condition.out_dim=256", "mar.width=256", "mar.heads=8", "mar.enc_layers=4",
                  "mar.dec_layers=4", "mar.diffusion.width=256", "mar.diffusion.depth=3"],
    },
}
UNIT_STATS = {level: {"shift": 0.0, "std_mean": 1.0, "std_sample": 1.0} for level in ("lr", "hr")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset (mar3d data prepare)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=40, help="training steps per run (timed: the second half)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training worker")
    p.add_argument("--workdir", default=None, help="where models, caches and runs go (default: a temp folder)")
    p.add_argument("--loop-steps", type=int, default=10, help="timed steps per repeat of the step-loop table")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the step-loop table (best kept)")
    return p.parse_args(argv)


def write_frozen(root: Path, name: str, spec: dict) -> tuple[Path, Path, list[str]]:
    """Random-init VAE and image-encoder folders of one config; its training overrides."""
    import torch

    from mar3d.config import load_config, to_dict
    from mar3d.inference import save_conditioner
    from mar3d.models.condition import ImageEncoder
    from mar3d.models.vae import ShapeVAE, VAEConfig
    from mar3d.train import load_train_config
    from mar3d.weights import save_model_dir

    torch.manual_seed(0)
    vae_cfg = load_config(VAEConfig, "vae_tiny", spec["vae"])
    vae_dir = save_model_dir(root / name / "vae", ShapeVAE(vae_cfg).state_dict(), to_dict(vae_cfg),
                             kind="vae", extra={"latent_stats": UNIT_STATS})
    cond_cfg = load_train_config("lr", "train_lr_tiny", ["vae_model_uri=x", *spec["train"]]).condition
    save_conditioner(ImageEncoder(cond_cfg), root / name / "cond")
    return vae_dir, root / name / "cond", spec["train"]


def train(root: Path, args, name: str, run: str, overrides: list[str]) -> dict:
    from mlflow import MlflowClient

    from mar3d.train import load_train_config, run_training

    half = max(1, args.steps // 2)
    cfg = load_train_config("lr", "train_lr_tiny", [
        f"data={args.data}", f"storage_path={root / 'runs'}", f"run_name={name}-{run}",
        "experiment=feature-cache-benchmark", "num_workers=1", "cpus_per_worker=1",
        f"threads_per_worker={args.threads}", f"batch_size={args.batch_size}", f"steps={2 * half}",
        "warmup_steps=1", f"log_every={half}", f"checkpoint_every={2 * half}", "eval_every=0",
        "num_eval_samples=1", "split=all", "ema_decay=null", *overrides])
    result = run_training(cfg)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    last = {key: client.get_metric_history(result.run_id, f"train/{key}")[-1].value
            for key in ("samples_per_s", "latent_ms", "data_ms", "compute_ms")}
    return last


class _Engine:
    """What MARStage.loss needs of a DeepSpeed engine: a callable with ``.module``."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args):
        return self.module(*args)


def loop_rates(args, vae_dir: Path, cond_dir: Path, overrides: list[str], cache: str) -> dict[str, float]:
    """Samples per CPU second of the bare training step, uncached vs cached batches."""
    import numpy as np
    import torch

    from mar3d.data.dataset import ShapeDataset
    from mar3d.train import load_train_config
    from mar3d.train.data import collate, dataset_kwargs
    from mar3d.train.feature_cache import FeatureCacheReader
    from mar3d.train.stages import MARStage

    torch.set_num_threads(1)
    cfg = load_train_config("lr", "train_lr_tiny", [f"vae_model_uri={vae_dir}", f"condition_model_uri={cond_dir}",
                                                    f"batch_size={args.batch_size}", *overrides])
    stage = MARStage(cfg, "lr")
    stage.setup(torch.device("cpu"), "")
    model = stage.build_model()
    engine, optimizer = _Engine(model), torch.optim.AdamW(model.parameters(), lr=1e-4)
    shapes = ShapeDataset(args.data, **dataset_kwargs(cfg, 0, "all"))
    reader = FeatureCacheReader(cache, args.data, "all", ("lr",))
    rng = np.random.default_rng(0)
    n = args.batch_size

    def batches(kind: str) -> list[dict]:
        if kind == "uncached":
            items = [shapes[i % len(shapes)] for i in range(n * args.loop_steps)]
        else:
            items = [{k: torch.from_numpy(v) for k, v in reader.sample(i % len(reader), rng).items()}
                     for i in range(n * args.loop_steps)]
        return [collate(items[i:i + n]) for i in range(0, len(items), n)]

    best = {"uncached": 0.0, "cached": 0.0}
    for _ in range(args.repeats):
        for kind in best:
            data = batches(kind)
            start = time.process_time()
            for step, batch in enumerate(data):
                loss = stage.loss(engine, batch, step)["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            best[kind] = max(best[kind], n * len(data) / (time.process_time() - start))
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from mar3d.ray_runtime import ensure_ray
    from mar3d.train.feature_cache import FeatureCacheConfig, build_feature_cache, resolved_surface_sizes

    from mar3d.train import load_train_config

    root = Path(args.workdir or tempfile.mkdtemp(prefix="mar3d-fcache-bench-"))
    ensure_ray()
    sizes = load_train_config("lr", "train_lr_tiny", ["vae_model_uri=x"]).surface_sizes
    sizes = resolved_surface_sizes(args.data, tuple(sizes))
    rows, loops = [], {}
    for name in args.configs:
        vae_dir, cond_dir, overrides = write_frozen(root, name, CONFIGS[name])
        common = [f"vae_model_uri={vae_dir}", f"condition_model_uri={cond_dir}", *overrides]
        uncached = train(root, args, name, "uncached", common)
        start = time.perf_counter()
        built = build_feature_cache(args.data, root / name / "cache", str(cond_dir), str(vae_dir),
                                    FeatureCacheConfig(surface_sizes=sizes), progress=False)
        build_s = time.perf_counter() - start
        cached = train(root, args, name, "cached", [*common, f"feature_cache={built.output}"])
        loops[name] = loop_rates(args, vae_dir, cond_dir, overrides, built.output)
        print(f"{name}: step loop samples per CPU second {loops[name]}", flush=True)
        for run, m in (("uncached", uncached), ("cached", cached)):
            rows.append((name, run, m, build_s if run == "cached" else None,
                         m["samples_per_s"] / uncached["samples_per_s"]))
        print(f"{name}: uncached {uncached}, cached {cached}, cache build {build_s:.1f} s "
              f"({built.rows} objects)", flush=True)
    print(f"\nMAR-LR, 1 worker x {args.threads} thread(s), batch {args.batch_size}, "
          f"{args.steps} steps per run (timed: the last {max(1, args.steps // 2)}); data {args.data}\n")
    print("| config | path | samples/s | latent_ms | data_ms | compute_ms | cache build s | vs uncached |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run, m, build_s, ratio in rows:
        build = f"{build_s:.1f}" if build_s is not None else "—"
        print(f"| {name} | {run} | {m['samples_per_s']:.2f} | {m['latent_ms']:.1f} | {m['data_ms']:.1f} | "
              f"{m['compute_ms']:.1f} | {build} | {ratio:.2f}× |")
    print(f"\nThe training step alone, samples per CPU second (1 thread, best of {args.repeats} x "
          f"{args.loop_steps} steps, batch {args.batch_size}):\n")
    print("| config | uncached | cached | cached / uncached |")
    print("|---|---|---|---|")
    for name, rate in loops.items():
        print(f"| {name} | {rate['uncached']:.2f} | {rate['cached']:.2f} | {rate['cached'] / rate['uncached']:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
