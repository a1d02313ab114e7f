"""Pyramid VAE vs standard (3DShape2VecSet) VAE at an equal latent token count.

Both VAEs are trained through the real training path (``mar3d.train.run_training``:
Ray Train + DeepSpeed, MLflow tracking) from the same training config, with the same
data, seed, steps and ``hr_tokens``; only ``vae.kind`` differs. The pyramid encoder
cross-attends to all K surface levels, the standard one to level 0 only (same points
at level 0, same FPS queries, same decoder). Then every shape is reconstructed by
each model and scored:

* encode the shape's surface pyramid (eval mode, posterior mean: ``sample=False``) at
  the HR token count, decode, extract a mesh (hierarchical grid + marching cubes);
* Chamfer distance / F-score / normal consistency of the mesh against the shape's
  stored ground-truth surface points + normals (``surface_0`` of the shard, which is
  sampled from the watertight mesh the occupancy labels come from), protocol of
  :func:`mar3d.metrics.mesh_metrics`;
* volume IoU of the decoder's logits (> 0 = inside) at the stored uniform volume
  points ``vol_points`` against ``vol_labels`` (no meshing involved), and the same on
  the near-surface points ``near_points`` (a harder, detail-sensitive IoU).

Printed: per model, mean +- std over shapes of every metric; the ratio of the means
pyramid / standard; and the number of shapes on which the pyramid model is better
(paired comparison: the same shapes, encodings from the same input points). With
``--hold-out K`` the same table is also printed for K shapes never trained on.

Data: ``--data`` is a prepared shard root (``mar3d data prepare``). Without it, the
script prepares ``--limit`` YCB objects (evenly spaced over the sorted object names, so
the set mixes categories) into ``--workdir`` with a small DataConfig; ``--hold-out K``
prepares K further objects into a separate root. MLflow: a SQLite store in the workdir
unless ``--mlflow-uri`` is given. The training runs are named after a hash of
everything that defines them: running the same command again reuses the trained
models (and a changed setting trains new ones).

Examples:
  python benchmarks/vae_ablation.py                      # 16 YCB objects, tiny VAEs
  python benchmarks/vae_ablation.py --limit 8 --hold-out 4 --steps 300 --tokens 128
  python benchmarks/vae_ablation.py --data outputs/data --steps 2000 --tokens 256 \\
      --set surface_sizes=[2048,512,128] --set batch_size=4
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_YCB = Path(os.environ.get("MAR3D_YCB", REPO.parent / "shared" / "datasets" / "ycb"))
KINDS = ("pyramid", "standard")
# metric name -> (column title, True if higher is better)
METRICS = {
    "chamfer": ("CD", False),
    "f_score": ("F-score", True),
    "normal_consistency": ("NC", True),
    "vol_iou": ("vol IoU", True),
    "near_iou": ("near IoU", True),
}


# ------------------------------------------------------------------------------- data
def small_data_config(num_workers: int, sharp_edge_fraction: float = 0.0):
    """Enough resolution for a meaningful GT at ~1-2 s per YCB mesh on one core; one small
    render per mesh (the schema needs images; the VAE never looks at them)."""
    from mar3d.data.config import DataConfig

    cfg = DataConfig(watertight_resolution=128, surface_sizes=(8192, 2048, 512),
                     num_vol=8192, num_near=8192, render_views=1, render_resolution=64,
                     render_up_axis="z", shard_size=16, num_workers=num_workers,
                     cpus_per_task=1.0, split_holdout_view=None,
                     sharp_edge_fraction=sharp_edge_fraction)
    cfg.validate()
    return cfg


def ycb_objects(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"YCB folder {root} does not exist (pass --ycb or --data)")
    names = sorted(p.parent.name for p in root.glob("*/textured.obj"))
    if not names:
        raise FileNotFoundError(f"{root} holds no <object>/textured.obj")
    return names


def split_objects(names: list[str], limit: int, hold_out: int) -> tuple[list[str], list[str]]:
    """``limit`` training objects evenly spaced over ``names`` (categories mixed), then
    ``hold_out`` objects evenly spaced over the rest."""
    if limit + hold_out > len(names):
        raise ValueError(f"--limit {limit} + --hold-out {hold_out} exceeds the {len(names)} objects")
    pick = np.linspace(0, len(names) - 1, limit).round().astype(int) if limit > 1 else np.array([0])
    train = [names[i] for i in sorted(set(pick.tolist()))]
    rest = [n for n in names if n not in train]
    held = []
    if hold_out:
        pick = np.linspace(0, len(rest) - 1, hold_out).round().astype(int) if hold_out > 1 else np.array([len(rest) // 2])
        held = [rest[i] for i in sorted(set(pick.tolist()))]
    return train, held


def link_objects(ycb: Path, names: list[str], folder: Path) -> Path:
    """A folder of symlinks to the chosen object folders (the data job walks it)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_symlink() and old.name not in names:
            old.unlink()
    for name in names:
        link = folder / name
        if not link.exists():
            link.symlink_to((ycb / name).resolve(), target_is_directory=True)
    return folder


def prepare(ycb: Path, names: list[str], workdir: Path, tag: str, num_workers: int,
            sharp_edge_fraction: float = 0.0) -> Path:
    from mar3d.config import to_dict
    from mar3d.data import prepare_dataset

    cfg = small_data_config(num_workers, sharp_edge_fraction)
    key = hashlib.sha256(json.dumps([names, to_dict(cfg)], sort_keys=True).encode()).hexdigest()[:10]
    meshes = link_objects(ycb, names, workdir / f"meshes-{tag}-{key}")
    output = workdir / f"data-{tag}-{key}"
    result = prepare_dataset(meshes, output, cfg, progress=False)
    print(f"[data] {tag}: {result.summary()}", flush=True)
    if result.total_rows == 0:
        raise RuntimeError(f"no {tag} shape could be prepared: see {output}/errors.parquet")
    return output


# --------------------------------------------------------------------------- training
def train_config(args, kind: str, data: Path, eval_data: Path | None, tracking_uri: str,
                 prefix: str = "ablation"):
    from mar3d.config import flatten
    from mar3d.train import load_train_config

    for ov in args.set:
        key = ov.split("=", 1)[0].strip()
        if key in ("vae.kind", "vae", "vae.hr_tokens", "steps", "seed", "data", "eval_data", "run_name"):
            raise ValueError(f"--set {ov!r}: {key} is set by the ablation itself (use its own flag)")
    overrides = [f"data={data}", f"storage_path={args.workdir / 'train'}", f"mlflow_uri={tracking_uri}",
                 f"experiment={args.experiment}", f"steps={args.steps}", f"seed={args.seed}",
                 f"num_workers={args.num_workers}", f"vae_level={args.vae_level}",
                 f"vae.hr_tokens={args.tokens}", *args.set, f"vae.kind={kind}",
                 # The ablation holds shapes out itself (--hold-out): train on every object.
                 "split=all"]
    if eval_data is not None:
        overrides.append(f"eval_data={eval_data}")
    cfg = load_train_config("vae", args.config, overrides)
    # Same name <=> same run definition (kind aside), so a re-run reuses the models.
    defining = {k: v for k, v in flatten(cfg).items() if k not in ("vae.kind", "run_name")}
    key = hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:10]
    cfg.run_name = f"{prefix}-{kind}-T{args.tokens}-{key}"
    cfg.validate()
    return cfg


@dataclass
class TrainedModel:
    kind: str
    model_dir: Path
    run_id: str
    seconds: float
    reused: bool
    final_metrics: dict = field(default_factory=dict)


def train_or_reuse(cfg) -> TrainedModel:
    from mar3d.train import run_training
    from mar3d.train.api import RUN_STATE

    run_dir = Path(cfg.storage_path).resolve() / cfg.name
    model_dir, state = run_dir / "model", run_dir / RUN_STATE
    if (model_dir / "model.safetensors").is_file() and state.is_file():
        print(f"[train] {cfg.vae.kind}: reusing {model_dir}", flush=True)
        return TrainedModel(cfg.vae.kind, model_dir, json.loads(state.read_text())["run_id"], 0.0, True)
    print(f"[train] {cfg.vae.kind}: run {cfg.name}, {cfg.steps} steps, {cfg.num_workers} workers", flush=True)
    result = run_training(cfg)
    print(f"[train] {cfg.vae.kind}: done in {result.seconds:.0f}s, run {result.run_id}", flush=True)
    return TrainedModel(cfg.vae.kind, result.model_dir, result.run_id, result.seconds, False,
                        {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})


# ----------------------------------------------------------------------- reconstruction
def occupancy_iou_np(logits: np.ndarray, labels: np.ndarray) -> float:
    pred, gt = logits > 0, labels > 0
    union = (pred | gt).sum()
    return 1.0 if union == 0 else float((pred & gt).sum() / union)


def input_pyramid(row: dict, sizes: tuple[int, ...], seed: int) -> list:
    """The same deterministic point subsets of each stored level for every model."""
    import torch

    rng = np.random.default_rng(seed)
    levels = []
    for k, n in enumerate(sizes):
        stored = row[f"surface_{k}"]
        if n > len(stored):
            raise ValueError(f"surface level {k}: {n} points requested, {len(stored)} stored")
        levels.append(torch.from_numpy(np.array(stored[rng.choice(len(stored), n, replace=False)]))[None])
    return levels


def reconstruct_shape(vae, surfaces: list, row: dict, resolution: int):
    """Encode ``surfaces`` (posterior mean, HR tokens), decode, extract a mesh
    (hierarchical, ``resolution``^3). Returns the mesh and the IoUs of the raw logits at
    ``row``'s stored volume / near-surface points against its stored labels."""
    import torch

    from mar3d.geometry.extract import extract_mesh, latent_occupancy_fn

    with torch.no_grad():
        kv = vae.decode(vae.encode(surfaces, level="hr", sample=False))
        vol = vae.query(kv, torch.from_numpy(np.array(row["vol_points"]))[None])[0].numpy()
        near = vae.query(kv, torch.from_numpy(np.array(row["near_points"]))[None])[0].numpy()
    extraction = extract_mesh(latent_occupancy_fn(vae, kv), resolution=resolution,
                              method="hierarchical", batch_size=32768)
    return extraction.mesh, {"vol_iou": occupancy_iou_np(vol, row["vol_labels"]),
                             "near_iou": occupancy_iou_np(near, row["near_labels"]),
                             "faces": int(len(extraction.mesh.faces)), "extract_s": extraction.seconds}


def reconstruct(models: dict, data: Path, sizes: tuple[int, ...], args, split: str) -> list[dict]:
    """Per shape and model: CD / F / NC of the extracted mesh, IoUs of the raw logits."""
    from mar3d.data.dataset import ShapeDataset
    from mar3d.metrics import mesh_metrics

    dataset = ShapeDataset(data, num_occ=16, seed=0)  # read_row only: stored arrays, no sampling
    rows = []
    for i in range(len(dataset)):
        row = dataset.read_row(i)
        surfaces = input_pyramid(row, sizes, args.seed + i)
        gt = (row["surface_0"][:, :3], row["surface_0"][:, 3:])
        record = {"uid": row["uid"], "split": split}
        for kind, vae in models.items():
            mesh, record[kind] = reconstruct_shape(vae, surfaces, row, args.resolution)
            scores = mesh_metrics(mesh, gt, num_points=args.metric_points, seed=args.seed)
            record[kind].update({k: scores[k] for k in ("chamfer", "f_score", "normal_consistency")})
        print(f"[eval] {split} {row['uid']}: " + "  ".join(
            f"{k} CD {record[k]['chamfer']:.4f} F {record[k]['f_score']:.3f} "
            f"NC {record[k]['normal_consistency']:.3f} IoU {record[k]['vol_iou']:.3f}" for k in models),
            flush=True)
        rows.append(record)
    return rows


# ------------------------------------------------------------------------------ report
def summarize(rows: list[dict], arms: tuple[str, ...] = KINDS, baseline: str = "standard",
              metrics: dict = METRICS) -> dict:
    """Per arm (model) and metric: mean, std over shapes; per other arm the ratio arm /
    ``baseline`` of the means and on how many shapes it is strictly better (paired).
    Empty reconstructions are counted separately; non-finite values (the inf CD of an
    empty reconstruction, an undefined metric) are left out of the mean, while F and NC
    (0 when empty) are included."""
    out = {"num_shapes": len(rows), "baseline": baseline,
           "empty": {a: sum(r[a]["faces"] == 0 for r in rows) for a in arms}}
    for name, (_, higher_better) in metrics.items():
        entry = {"ratio": {}, "wins": {}}
        for arm in arms:
            values = np.array([r[arm][name] for r in rows], dtype=np.float64)
            values = values[np.isfinite(values)]
            entry[arm] = {"mean": float(values.mean()) if values.size else math.nan,
                          "std": float(values.std()) if values.size else math.nan}
        base_mean = entry[baseline]["mean"]
        for arm in arms:
            if arm == baseline:
                continue
            entry["ratio"][arm] = entry[arm]["mean"] / base_mean if base_mean else math.nan
            pairs = [(r[arm][name], r[baseline][name]) for r in rows]
            entry["wins"][arm] = sum(bool((a > b) if higher_better else (a < b)) for a, b in pairs)
        out[name] = entry
    return out


def table(summary: dict, title: str, arms: tuple[str, ...] = KINDS, metrics: dict = METRICS) -> str:
    """Markdown: mean ± std per arm, then ratio and paired wins of each arm vs the baseline."""
    n, base = summary["num_shapes"], summary["baseline"]
    others = [a for a in arms if a != base]
    head = ([f"{a} (mean ± std)" for a in arms] + [f"{a} / {base}" for a in others]
            + [f"{a} better on" for a in others])
    lines = [f"### {title} ({n} shapes)", "", "| metric | " + " | ".join(head) + " |",
             "|---" * (len(head) + 1) + "|"]
    for name, (label, higher_better) in metrics.items():
        e = summary[name]
        cells = [f"{e[a]['mean']:.4f} ± {e[a]['std']:.4f}" for a in arms]
        cells += [f"{e['ratio'][a]:.3f}" if math.isfinite(e["ratio"][a]) else "n/a" for a in others]
        cells += [f"{e['wins'][a]}/{n}" for a in others]
        lines.append(f"| {label} {'↑' if higher_better else '↓'} | " + " | ".join(cells) + " |")
    empty = summary["empty"]
    if any(empty.values()):
        lines.append("\nEmpty reconstructions (no surface extracted): "
                     + ", ".join(f"{a} {empty[a]}" for a in arms) + ". They count as F = NC = 0 in "
                     "the means; CD (inf for them) is averaged over the non-empty reconstructions only.")
    return "\n".join(lines)


SPLIT_TITLES = {"train": "Training shapes (reconstruction)", "heldout": "Held-out shapes (generalization)"}


def training_summary(cfg, args, sizes: tuple[int, ...]) -> str:
    """The settings that define the compared training runs and the extraction, in words."""
    return (f"{args.steps} steps (vae_level={args.vae_level}), seed {args.seed}, batch "
            f"{cfg.batch_size} x {cfg.num_workers} workers, lr {cfg.lr}, surface points per level "
            f"{list(sizes)}, width {cfg.vae.width}, enc/dec layers {cfg.vae.enc_layers}/"
            f"{cfg.vae.dec_layers}, query_mode {cfg.vae.query_mode}; extraction "
            f"{args.resolution}^3 hierarchical")


def report_text(header: str, tables: list[str], timing: dict) -> str:
    text = "\n\n".join([header, *tables])
    return text + "\n\nTimes: " + ", ".join(f"{k} {v:.0f}s" for k, v in timing.items())


def run_record(model: TrainedModel) -> dict:
    return {"run_id": model.run_id, "model_dir": str(model.model_dir), "reused": model.reused,
            "final_train_metrics": model.final_metrics}


def write_report(args, stem: str, text: str, results: dict) -> Path:
    """Prints ``text``, writes it to <workdir>/<stem>.md and ``results`` (plus the
    arguments) to <stem>.json; returns the .md path."""
    print("\n" + text, flush=True)
    report = args.workdir / f"{stem}.md"
    report.write_text(text + "\n")
    results = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **results}
    (args.workdir / f"{stem}.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {report} and {args.workdir / stem}.json", flush=True)
    return report


def log_to_mlflow(tracking_uri: str, trained: dict, summaries: dict, report: Path,
                  metrics: dict = METRICS, artifact_dir: str = "ablation") -> None:
    """Reconstruction means go into each model's training run; the report is attached."""
    from mar3d import tracking

    client = tracking.client(tracking_uri)
    for arm, model in trained.items():
        for split, summary in summaries.items():
            for name in metrics:
                value = summary[name][arm]["mean"]
                if math.isfinite(value):
                    client.log_metric(model.run_id, f"recon_{split}/{name}", value)
        client.log_artifact(model.run_id, str(report), artifact_dir)


# -------------------------------------------------------------------------------- main
def benchmark_parser(doc: str, workdir: Path, experiment: str, steps: int = 1000) -> argparse.ArgumentParser:
    """The options every benchmark on this protocol shares (YCB source, training run,
    extraction, tracking); ``doc`` is the script's docstring (description + examples)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc[doc.index("Examples:"):])
    p.add_argument("--ycb", type=Path, default=DEFAULT_YCB, help="YCB root (<object>/textured.obj)")
    p.add_argument("--workdir", type=Path, default=workdir)
    p.add_argument("--config", default="train_vae_tiny",
                   help="training config (file or preset) shared by every model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra TrainConfig override for every run (repeatable)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--tokens", type=int, default=128, help="HR latent tokens of every VAE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (and data workers)")
    p.add_argument("--vae-level", choices=("hr", "alternate"), default="hr",
                   help="hr: every step trains the compared token count; alternate: the MAR-3D "
                        "recipe (every other step LR latents)")
    p.add_argument("--resolution", type=int, default=128, help="extraction grid cells per axis")
    p.add_argument("--metric-points", type=int, default=8192,
                   help="points sampled on each reconstruction for CD / F / NC")
    p.add_argument("--experiment", default=experiment)
    p.add_argument("--mlflow-uri", default="", help="default: sqlite:///<workdir>/mlflow.db")
    return p


def check_args(p: argparse.ArgumentParser, args, positive: tuple[str, ...] = ()) -> None:
    """Counts that must be >= 1 (the shared ones and ``positive``); resolves --workdir."""
    for name in ("steps", "tokens", "num_workers", "resolution", "metric_points", *positive):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.workdir = args.workdir.resolve()


def start_runtime(args) -> str:
    """Workdir, one-thread workers, a local Ray instance; returns the MLflow tracking URI."""
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import ray
    import ray.data  # noqa: F401  (configures its loggers on import; quieten them after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset progress chatter
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    return args.mlflow_uri or f"sqlite:///{args.workdir / 'mlflow.db'}"


def input_sizes(cfg, data: Path) -> tuple[int, ...]:
    """Reconstruction uses the points per level the models were trained with."""
    from mar3d.data.prepare import load_manifest

    return tuple(cfg.surface_sizes) or tuple(load_manifest(data)["config"]["surface_sizes"])


def parse_args(argv=None):
    p = benchmark_parser(__doc__, REPO / "outputs" / "vae_ablation", "vae-ablation")
    p.add_argument("--data", type=Path, help="prepared shard root of the training shapes "
                   "(default: prepare --limit YCB objects into --workdir)")
    p.add_argument("--eval-data", type=Path, help="prepared shard root of held-out shapes "
                   "(default: prepare --hold-out YCB objects, if any)")
    p.add_argument("--limit", type=int, default=16, help="YCB objects to train on (without --data)")
    p.add_argument("--hold-out", type=int, default=0, help="further YCB objects only reconstructed")
    args = p.parse_args(argv)
    check_args(p, args, ("limit",))
    if args.hold_out < 0:
        p.error("--hold-out must be >= 0")
    if args.eval_data and args.hold_out:
        p.error("--eval-data and --hold-out both name held-out shapes; give one")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    tracking_uri = start_runtime(args)
    import torch

    from mar3d.inference import load_vae

    data, eval_data = args.data, args.eval_data
    if data is None:
        train_names, held_names = split_objects(ycb_objects(args.ycb), args.limit, args.hold_out)
        print(f"[data] train objects: {' '.join(train_names)}", flush=True)
        data = prepare(args.ycb, train_names, args.workdir, "train", args.num_workers)
        if held_names:
            print(f"[data] held-out objects: {' '.join(held_names)}", flush=True)
            eval_data = prepare(args.ycb, held_names, args.workdir, "heldout", args.num_workers)
    prepared_s = time.perf_counter() - started

    cfgs = {kind: train_config(args, kind, data, eval_data, tracking_uri) for kind in KINDS}
    trained = {kind: train_or_reuse(cfg) for kind, cfg in cfgs.items()}
    sizes = input_sizes(cfgs["pyramid"], data)

    torch.manual_seed(args.seed)
    models = {kind: load_vae(m.model_dir)[0] for kind, m in trained.items()}
    eval_started = time.perf_counter()
    rows = {"train": reconstruct(models, data, sizes, args, "train")}
    if eval_data is not None:
        rows["heldout"] = reconstruct(models, eval_data, sizes, args, "heldout")
    eval_s = time.perf_counter() - eval_started

    summaries = {split: summarize(r) for split, r in rows.items()}
    cfg = cfgs["pyramid"]
    header = (f"Pyramid vs standard VAE, {args.tokens} HR tokens each: {training_summary(cfg, args, sizes)}; "
              f"CD/F(tau=0.05)/NC vs stored surface_0, IoUs from decoder logits.")
    timing = {"prepare_s": prepared_s, "eval_s": eval_s, "total_s": time.perf_counter() - started,
              **{f"train_{k}_s": m.seconds for k, m in trained.items()}}
    text = report_text(header, [table(s, SPLIT_TITLES[split]) for split, s in summaries.items()], timing)
    # One report per run definition (the training runs' hash), so seeds do not overwrite.
    stem = f"vae_ablation-T{args.tokens}-seed{args.seed}-{cfg.run_name.rsplit('-', 1)[1]}"
    results = {"data": str(data), "eval_data": str(eval_data) if eval_data else None,
               "surface_sizes": list(sizes), "tracking_uri": tracking_uri,
               "runs": {k: run_record(m) for k, m in trained.items()},
               "summary": summaries, "per_shape": rows, "timing": timing}
    report = write_report(args, stem, text, results)
    log_to_mlflow(tracking_uri, trained, summaries, report)
    return results


if __name__ == "__main__":
    main()
