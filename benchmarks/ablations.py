"""The paper's cascade ablations on the main job's trained models, over several seeds.

MAR-3D's claims: the cascade (MAR-LR -> MAR-HR) beats MAR-LR alone, and condition
augmentation of the LR tokens (MAR-HR trained and sampled on noised LR tokens) makes the
cascade work. This benchmark measures both on the production path's own models: it
starts from the runs of ``benchmarks/seeds.py`` (one main-job run per training seed:
prepare, VAE, MAR-LR, MAR-HR, evaluation) and, per seed,

* ``cascade``: the run's own evaluation (LR -> HR, the release the gate saw);
* ``lr_only``: the same VAE and MAR-LR, evaluated without MAR-HR (``pipeline.use_hr=false``);
* ``no_cond_aug``: MAR-HR trained again with the run's seed, VAE and image encoder, but
  without condition augmentation (``cond_aug_t_min = t_max = t_infer = 0``: MAR-HR sees
  clean ground-truth LR tokens in training and the generated ones as they are), then the
  cascade evaluated with it;
* ``joint``: the paper's single-stage alternative, one MAR that generates the HR token
  set from the image alone (``mar.latents: hr``), trained with MAR-LR's recipe, steps,
  seed, VAE and image encoder, evaluated on its own.

Every variant is scored by the evaluation job (:func:`mar3d.evaluate.evaluate_components`,
the release loading path) on the same objects and views as the run's own evaluation
(the preset's evaluation config, groups ``seen_view`` and ``synth_heldout``, the same
sampling seed); contact sheets and the baseline are not redrawn (the baseline is the
run's). It prints mean ± std (population std over the seeds) of F-score@0.05, Chamfer
and normal consistency per group and variant, next to the mean-shape baseline, and the
VAE's own reconstruction IoU of HR and LR latents on training objects (eval) and
held-out objects (val): the ceiling of each stage. Results go to
``WORKDIR/ablations.md`` and ``WORKDIR/ablations.json``; a variant whose report exists is
read, not run again.

Examples (from the repository root, venv active):
  python benchmarks/seeds.py --workdir outputs/seeds                  # the 3 main-job runs
  python benchmarks/ablations.py --seeds-workdir outputs/seeds        # the ablations on them
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("cascade", "lr_only", "no_cond_aug", "joint")
GROUPS = ("seen_view", "synth_heldout")
METRICS = (("f_score", "F-score@0.05 ↑"), ("chamfer", "Chamfer ↓"), ("normal_consistency", "normal cons. ↑"))
# MAR-HR on clean LR tokens: no noise in training, none added to generated tokens.
NO_COND_AUG = ["mar.cond_aug_t_min=0.0", "mar.cond_aug_t_max=0.0", "mar.cond_aug_t_infer=0.0"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds-workdir", type=Path, default=REPO / "outputs" / "seeds",
                   help="a benchmarks/seeds.py work folder (its seeds.json lists the runs)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the variants' models and reports go (default: SEEDS_WORKDIR/ablations)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--eval-config", default="eval_tiny", help="evaluation preset (default: eval_tiny)")
    p.add_argument("--hr-config", default="train_hr_tiny", help="MAR-HR training preset (default: train_hr_tiny)")
    p.add_argument("--lr-config", default="train_lr_tiny",
                   help="MAR-LR training preset, the joint model's recipe (default: train_lr_tiny)")
    p.add_argument("--num-workers", type=int, default=2)
    return p.parse_args(argv)


def seed_runs(seeds_workdir: Path) -> list[dict]:
    """``[{"seed", "run"}]`` of a seeds.py work folder, refused if it has none."""
    summary = seeds_workdir / "seeds.json"
    if not summary.is_file():
        raise FileNotFoundError(f"{summary} does not exist: run benchmarks/seeds.py --workdir {seeds_workdir} first")
    runs = [{"seed": r["seed"], "run": Path(r["run"])} for r in json.loads(summary.read_text())["results"]]
    for r in runs:
        for stage in ("vae", "lr", "hr"):
            if not (r["run"] / "train" / stage / "model").is_dir():
                raise FileNotFoundError(f"seed {r['seed']}: {r['run']}/train/{stage}/model is missing")
    return runs


def vae_run(run: Path) -> dict:
    """The run's VAE training record (``run_id``, ``tracking_uri``). That MLflow is where
    the run's components' ``runs:/`` URIs resolve, so the variants are tracked there too
    (experiment ``mar3d-ablations``)."""
    return json.loads((run / "train" / "vae" / "mar3d_run.json").read_text())


def vae_ceiling(info: dict) -> dict[str, float]:
    """The VAE run's final reconstruction IoUs (eval: training objects, val: held out)."""
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).data.metrics
    return {k: metrics[k] for k in ("eval/iou_hr", "eval/iou_lr", "val/iou_hr", "val/iou_lr") if k in metrics}


def train_variant(args, variant: str, seed: int, run: Path, out: Path, tracking_uri: str) -> Path:
    """The variant's retrained stage (``no_cond_aug``: MAR-HR, ``joint``: the single-stage
    MAR) with ``run``'s seed, VAE and image encoder; its model folder."""
    from mar3d.registry import read_model_config
    from mar3d.train import load_train_config, run_training

    model = out / "train" / "model"
    if model.is_dir():
        return model
    vae = run / "train" / "vae" / "model"
    common = [f"data={run / 'data'}", f"storage_path={out}", f"mlflow_uri={tracking_uri}", "run_name=train",
              "experiment=mar3d-ablations", f"num_workers={args.num_workers}", f"seed={seed}",
              f"vae_model_uri={vae}", f"condition_model_uri={run / 'train' / 'lr' / 'conditioner'}"]
    if variant == "no_cond_aug":
        cfg = load_train_config("hr", args.hr_config, common + NO_COND_AUG)
    else:
        hr_tokens = read_model_config(str(vae))["model"]["hr_tokens"]
        cfg = load_train_config("lr", args.lr_config, common + ["mar.latents=hr", f"mar.seq_len={hr_tokens}"])
    run_training(cfg)
    if not model.is_dir():
        raise RuntimeError(f"{variant}: training left no model folder at {model}")
    return model


def evaluate_variant(args, variant: str, seed: int, run: Path, tracking_uri: str) -> dict[str, float]:
    """The variant's evaluation metrics (read from its report when it exists)."""
    from mar3d.config import load_config
    from mar3d.evaluate import EvalConfig, evaluate_components

    if variant == "cascade":
        return json.loads((run / "eval" / "report.json").read_text())["metrics"]
    out = args.workdir / f"seed-{seed}" / variant
    report = out / "eval" / "report.json"
    if report.is_file():
        return json.loads(report.read_text())["metrics"]
    overrides = [f"groups=[{','.join(GROUPS)}]", "baseline=false", "contact_sheet=false", "previews=0",
                 "with_vae_iou=false", f"run_name={variant}-seed{seed}", "experiment=mar3d-ablations"]
    lr, hr = run / "train" / "lr" / "model", run / "train" / "hr" / "model"
    if variant == "no_cond_aug":
        hr = train_variant(args, variant, seed, run, out, tracking_uri)
    elif variant == "joint":
        lr, hr = train_variant(args, variant, seed, run, out, tracking_uri), None
    elif variant == "lr_only":
        hr = None
    if hr is None:
        overrides.append("pipeline.use_hr=false")
    cfg = load_config(EvalConfig, args.eval_config, overrides)
    result = evaluate_components(str(run / "train" / "vae" / "model"), str(lr), str(hr) if hr else None,
                                 run / "data", out / "eval", cfg, tracking_uri=tracking_uri)
    return result.metrics


def mean_std(values: list[float]) -> str:
    from benchmarks.seeds import mean_std as mean_and_std  # the seeds table's statistics

    return "{:.3f} ± {:.3f}".format(*mean_and_std(values))


def table(results: list[dict], variants: list[str]) -> str:
    seeds = len(results)
    lines = [f"| group | metric | {' | '.join(variants)} | mean shape |", "|---|---|" + "---|" * (len(variants) + 1)]
    for group in GROUPS:
        for key, label in METRICS:
            cells = [mean_std([r["variants"][v][f"{group}/{key}"] for r in results]) for v in variants]
            base = [r["variants"]["cascade"].get(f"{group}/baseline/{key}") for r in results
                    if "cascade" in r["variants"]]
            lines.append(f"| {group} | {label} | {' | '.join(cells)} | "
                         f"{mean_std(base) if base and None not in base else '–'} |")
    lines += ["", f"VAE reconstruction IoU (mean ± std over {seeds} seeds; eval: training objects, "
                  "val: held-out objects)", "", "| latents | eval | val |", "|---|---|---|"]
    for level in ("hr", "lr"):
        lines.append(f"| {level.upper()} | {mean_std([r['vae'][f'eval/iou_{level}'] for r in results])} | "
                     f"{mean_std([r['vae'][f'val/iou_{level}'] for r in results])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir or args.seeds_workdir / "ablations"
    args.workdir.mkdir(parents=True, exist_ok=True)
    variants = [v for v in VARIANTS if v in args.variants]
    results = []
    for entry in seed_runs(args.seeds_workdir):
        seed, run = entry["seed"], entry["run"]
        info = vae_run(run)
        record = {"seed": seed, "run": str(run), "vae": vae_ceiling(info), "variants": {}, "seconds": {}}
        for variant in variants:
            start = time.perf_counter()
            print(f"seed {seed}: {variant}", flush=True)
            record["variants"][variant] = evaluate_variant(args, variant, seed, run, info["tracking_uri"])
            record["seconds"][variant] = time.perf_counter() - start
        results.append(record)
    text = table(results, variants)
    print(text)
    (args.workdir / "ablations.md").write_text(text + "\n")
    (args.workdir / "ablations.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
