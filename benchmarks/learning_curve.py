"""Learning curve of the whole cascade: quality against training compute.

The local demo's preset (``--preset tiny``: the training and evaluation configs of
``mar3d pipeline run --local``) is trained at several budgets -- every stage's ``steps``
(and warm-up, checkpoint and evaluation intervals) multiplied by the same factor --
through the production training path (``mar3d.train.run_training``: Ray Train +
DeepSpeed, MLflow), then evaluated by the production evaluation (``mar3d.evaluate``)
on the dataset's own split:

* VAE reconstruction IoU of training objects (the VAE run's ``eval/iou_hr``) and of
  held-out objects (``val/iou_hr``);
* per evaluation group -- (a) ``seen_view``: training objects from the view training
  never saw; (b) ``heldout_objects``: objects training never saw -- the F-score,
  top-1 retrieval and diversity ratio of the generated meshes, next to the constant
  mean-shape baseline.

Printed as a table, plotted against the training samples the cascade saw (PNG), and
both logged to MLflow (experiment ``mar3d-benchmarks``). Budgets are independent runs
from scratch (same seed), not checkpoints of one run.

Examples (from the repository root, venv active):
  python benchmarks/learning_curve.py                          # 0.25x, 1x, 4x of the tiny preset
  python benchmarks/learning_curve.py --budgets 0.5 1 2 --data outputs/pipeline/runs/<job>/data
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_YCB = Path(os.environ.get("MAR3D_YCB", REPO.parent / "shared" / "datasets" / "ycb"))
GROUPS = ("seen_view", "heldout_objects")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 1.0, 4.0],
                   help="multipliers of the preset's training steps (default: 0.25 1 4)")
    p.add_argument("--preset", default="tiny", help="pipeline preset whose configs are trained")
    p.add_argument("--data", type=Path, default=None,
                   help="a prepared dataset (default: prepare --meshes with the preset's data config)")
    p.add_argument("--meshes", type=Path, default=DEFAULT_YCB, help="meshes to prepare without --data")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "learning_curve")
    p.add_argument("--mlflow-uri", default=None, help="default: sqlite in the workdir")
    p.add_argument("--num-workers", type=int, default=2)
    return p.parse_args(argv)


def prepare(args, preset: dict) -> Path:
    from mar3d.config import load_config
    from mar3d.data.config import DataConfig
    from mar3d.data.prepare import prepare_dataset

    if args.data is not None:
        return args.data
    out = args.workdir / "data"
    cfg = load_config(DataConfig, preset["data_config"])
    result = prepare_dataset(args.meshes, out, cfg, progress=True)
    print(result.summary(), flush=True)
    return out


def train_budget(args, preset: dict, data: Path, factor: float, tracking_uri: str) -> dict:
    """Train VAE -> LR -> HR at ``factor`` x the preset's steps; returns stage -> TrainResult."""
    from pipelines.presets import scaled_steps
    from mar3d.train import load_train_config, run_training

    results, samples = {}, 0
    for stage in ("vae", "lr", "hr"):
        config = preset[f"{stage}_config"]
        overrides = [f"data={data}", f"storage_path={args.workdir / 'train'}",
                     f"run_name={stage}-x{factor:g}", f"mlflow_uri={tracking_uri}",
                     f"num_workers={args.num_workers}", "experiment=mar3d-learning-curve",
                     *scaled_steps(config, factor)]
        if stage != "vae":
            overrides.append(f"vae_model_uri={results['vae'].model_uri}")
        if stage == "hr":  # one image encoder per release: HR trains on LR's
            overrides.append(f"condition_model_uri={results['lr'].condition_model_uri}")
        cfg = load_train_config(stage, config, overrides)
        started = time.monotonic()
        results[stage] = run_training(cfg)
        samples += cfg.steps * cfg.batch_size * cfg.num_workers
        print(f"  x{factor:g} {stage}: {cfg.steps} steps in {time.monotonic() - started:.0f} s", flush=True)
    return {"results": results, "samples": samples}


def evaluate_budget(args, preset: dict, data: Path, factor: float, trained: dict, tracking_uri: str) -> dict:
    from mar3d.config import load_config
    from mar3d.evaluate import EvalConfig, evaluate_components

    r = trained["results"]
    cfg = load_config(EvalConfig, preset["eval_config"], [f"run_name=learning-curve-x{factor:g}"])
    ev = evaluate_components(r["vae"].model_uri, r["lr"].model_uri, r["hr"].model_uri, data,
                             args.workdir / "eval" / f"x{factor:g}", cfg, tracking_uri=tracking_uri,
                             progress=False)
    vae = r["vae"].metrics
    row = {"budget": factor, "samples": trained["samples"],
           "vae_iou_train": vae.get("eval/iou_hr"), "vae_iou_heldout": vae.get("val/iou_hr")}
    for group in GROUPS:
        for key in ("f_score", "retrieval_top1", "retrieval_hits", "diversity_ratio", "num_objects"):
            row[f"{group}/{key}"] = ev.metrics.get(f"{group}/{key}")
        row[f"{group}/baseline_f_score"] = ev.metrics.get(f"{group}/baseline/f_score")
    row["contact_sheets"] = {g: str(p) for g, p in ev.contact_sheets.items()}
    return row


def table(rows: list[dict]) -> str:
    def f(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    lines = ["| budget | samples seen | VAE IoU train / held-out | (a) F / baseline F | (a) retrieval | "
             "(a) diversity | (b) F / baseline F | (b) retrieval | (b) diversity |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r['budget']:g}x", f"{r['samples']:,}", f"{f(r['vae_iou_train'])} / {f(r['vae_iou_heldout'])}"]
        for g in GROUPS:
            n = int(r[f"{g}/num_objects"] or 0)
            cells += [f"{f(r[f'{g}/f_score'])} / {f(r[f'{g}/baseline_f_score'])}",
                      f"{int(r[f'{g}/retrieval_hits'] or 0)}/{n}", f(r[f"{g}/diversity_ratio"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["samples"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot(x, [r["vae_iou_train"] for r in rows], "o-", label="training objects")
    axes[0].plot(x, [r["vae_iou_heldout"] for r in rows], "s--", label="held-out objects")
    axes[0].set_title("VAE reconstruction IoU")
    for g, style in zip(GROUPS, ("o-", "s--")):
        axes[1].plot(x, [r[f"{g}/f_score"] for r in rows], style, label=f"{g}")
        axes[1].plot(x, [r[f"{g}/baseline_f_score"] for r in rows], style, alpha=0.35,
                     label=f"{g}: mean-shape baseline")
        axes[2].plot(x, [r[f"{g}/retrieval_top1"] for r in rows], style, label=g)
        n = max(int(r[f"{g}/num_objects"] or 1) for r in rows)
        axes[2].axhline(1.0 / n, color="gray", lw=0.8, ls=":")
    axes[1].set_title("F-score@0.05 of generated meshes")
    axes[2].set_title("top-1 retrieval (dotted: chance)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("training samples seen (VAE + MAR-LR + MAR-HR)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from mar3d import tracking
    from pipelines.presets import pipeline_preset

    preset = pipeline_preset(args.preset)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.mlflow_uri or f"sqlite:///{args.workdir / 'mlflow.db'}"
    data = prepare(args, preset)
    rows = []
    for factor in sorted(args.budgets):
        print(f"budget x{factor:g}: training the cascade", flush=True)
        trained = train_budget(args, preset, data, factor, tracking_uri)
        rows.append(evaluate_budget(args, preset, data, factor, trained, tracking_uri))
        print(table(rows), flush=True)
    png = args.workdir / "learning_curve.png"
    plot(rows, png)
    (args.workdir / "learning_curve.json").write_text(json.dumps(rows, indent=2))
    text = table(rows)
    print(f"\nLearning curve, preset {args.preset}, dataset {data}:\n{text}\nplot: {png}")
    run_id = tracking.start_or_resume_run(tracking_uri, "mar3d-benchmarks", "learning-curve",
                                          tags={"mar3d.kind": "benchmark"})
    client = tracking.client(tracking_uri)
    for r in rows:
        step = int(r["samples"])
        tracking.log_metrics(tracking_uri, run_id, {k: float(v) for k, v in r.items()
                                                    if isinstance(v, (int, float)) and v is not None}, step=step)
    (args.workdir / "learning_curve.md").write_text(text + "\n")
    for path in (png, args.workdir / "learning_curve.md", args.workdir / "learning_curve.json"):
        client.log_artifact(run_id, str(path))
    tracking.end_run(tracking_uri, run_id)
    print(f"MLflow run {run_id} at {tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
