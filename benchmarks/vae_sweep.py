"""VAE settings at the main job's budget: which ones move reconstruction IoU, per category.

Trains one shape VAE per variant (the ``vae_tiny`` preset with ``--set``-style changes)
for the same number of steps on the training rows of a prepared dataset, then encodes
every held-out row (posterior mean, HR tokens) and scores the decoder's occupancy at the
row's stored uniform volume points against its labels: the "VAE recon. IoU" of the
evaluation job. Printed: one row per variant and seed with the mean IoU over the corpus's
held-out objects, over the held-out scans, and per corpus category, then mean ± std over
seeds per variant next to the first variant's (the baseline) and their ratio.

The loop is a plain single-process PyTorch loop (AdamW, warm-up + cosine, the preset's
loss, HR/LR latents alternating, as the training stage does): it compares model and data
settings quickly on one machine; it is not the production training path, so a setting it
favours is then measured through `mar3d pipeline run` (``benchmarks/seeds.py``).

Examples:
  python benchmarks/vae_sweep.py --data outputs/pipeline/runs/<job>/data
  python benchmarks/vae_sweep.py --data DATA --seeds 0 1 --steps 1950 \\
      --variant base= --variant dec1=dec_layers=1 --variant near50=train.near_fraction=0.5
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_VARIANTS = ["base=", "dec1=dec_layers=1", "near50=train.near_fraction=0.5",
                    "tokens256=hr_tokens=256,lr_tokens=128", "width96=width=96"]
TRAIN_DEFAULTS = {"num_occ": 2048, "near_fraction": 0.25, "batch_size": 8, "lr": 2e-3,
                  "surface_sizes": (1024, 256, 64), "warmup_steps": 40, "min_lr_ratio": 0.1}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``name=key=value,key=value`` -> (name, VAE overrides, training overrides)."""
    import yaml

    name, _, spec = text.partition("=")
    vae, train = {}, {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        target, key = (train, key[len("train."):]) if key.startswith("train.") else (vae, key)
        target[key] = yaml.safe_load(value)
    return name, vae, train


def categories(dataset) -> dict[str, str]:
    import pyarrow.parquet as pq

    out = {}
    for path in sorted({str(p) for p, _ in dataset.index}):
        rows = pq.read_table(path, columns=["uid", "category"]).to_pylist()
        out.update({r["uid"]: r["category"] or "scan" for r in rows})
    return out


def train(data: str, vae_overrides: dict, train_overrides: dict, steps: int, seed: int):
    import torch

    from mar3d.config import load_config
    from mar3d.data.dataset import ShapeDataset
    from mar3d.models.vae import ShapeVAE, VAEConfig

    settings = {**TRAIN_DEFAULTS, **train_overrides}
    cfg = dataclasses.replace(load_config(VAEConfig, "vae_tiny"), **vae_overrides)
    torch.manual_seed(seed)
    rows = ShapeDataset(data, surface_sizes=tuple(settings["surface_sizes"]), num_occ=settings["num_occ"],
                        near_fraction=settings["near_fraction"], seed=seed, split="train",
                        with_image=False, cache_rows=1 << 20)
    model = ShapeVAE(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    order, pos, epoch = rng.permutation(len(rows)), 0, 0
    started = time.perf_counter()
    for step in range(steps):
        if pos + settings["batch_size"] > len(order):
            epoch += 1
            rows.set_epoch(epoch)
            order, pos = rng.permutation(len(rows)), 0
        items = [rows[int(i)] for i in order[pos:pos + settings["batch_size"]]]
        pos += settings["batch_size"]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "uid"}
        warm = min(1.0, (step + 1) / settings["warmup_steps"])
        cosine = settings["min_lr_ratio"] + (1 - settings["min_lr_ratio"]) * 0.5 * (1 + np.cos(np.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = settings["lr"] * warm * cosine
        out = model(batch, level="hr" if step % 2 == 0 else "lr", sample=True)
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), tuple(settings["surface_sizes"]), time.perf_counter() - started


def score(model, data: str, sizes: tuple[int, ...]) -> dict[str, list[float]]:
    """Category -> reconstruction IoUs of the held-out rows."""
    import torch

    from mar3d.data.dataset import ShapeDataset
    from mar3d.models.vae import occupancy_iou

    rows = ShapeDataset(data, surface_sizes=sizes, num_occ=1, near_fraction=0.0, split="val",
                        with_image=False, cache_rows=0)
    cats = categories(rows)
    per: dict[str, list[float]] = collections.defaultdict(list)
    with torch.no_grad():
        for i in range(len(rows)):
            row = rows.read_row(i)
            surfaces = []
            for k, n in enumerate(sizes):
                level = np.asarray(row[f"surface_{k}"], np.float32)
                surfaces.append(torch.from_numpy(np.ascontiguousarray(level[:: len(level) // n][:n]))[None])
            kv = model.decode(model.encode(surfaces, level="hr", sample=False))
            points = torch.from_numpy(np.array(row["vol_points"], np.float32))[None]
            logits = torch.cat([model.query(kv, points[:, j:j + 8192]) for j in range(0, points.shape[1], 8192)], 1)
            labels = torch.from_numpy(np.array(row["vol_labels"], np.float32))
            per[cats[row["uid"]]].append(float(occupancy_iou(logits[0], labels)))
    return per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a prepared shard root with a corpus (mar3d data prepare)")
    parser.add_argument("--steps", type=int, default=1950, help="training steps per variant (batch 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=key=value,... (VAE keys, or train.num_occ / near_fraction / batch_size / lr "
                             "/ surface_sizes); the first is the baseline. Default: " + " ".join(DEFAULT_VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    results: dict[str, list[float]] = collections.defaultdict(list)
    cat_names: list[str] = []
    print("| variant | seed | corpus IoU | scan IoU | train s | per category |\n|---|---|---|---|---|---|")
    for name, vae_overrides, train_overrides in variants:
        for seed in args.seeds:
            model, sizes, seconds = train(args.data, vae_overrides, train_overrides, args.steps, seed)
            per = score(model, args.data, sizes)
            corpus = [v for c, vs in per.items() if c != "scan" for v in vs]
            cat_names = sorted(c for c in per if c != "scan")
            results[name].append(float(np.mean(corpus)))
            cats = " ".join(f"{c} {np.mean(per[c]):.2f}" for c in cat_names)
            print(f"| {name} | {seed} | {np.mean(corpus):.3f} | {np.mean(per.get('scan', [np.nan])):.3f} | "
                  f"{seconds:.0f} | {cats} |", flush=True)
    base = variants[0][0]
    print(f"\n| variant | corpus IoU mean ± std ({len(args.seeds)} seeds) | / {base} |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {np.mean(values):.3f} ± {np.std(values):.3f} | "
              f"{np.mean(values) / np.mean(results[base]):.3f} |")


if __name__ == "__main__":
    main()
