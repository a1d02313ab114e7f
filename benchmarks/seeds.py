"""The main job's quality over several training seeds: mean ± std next to the baseline.

One run is not a result: two runs of the same command can differ by more than the gap
to the constant mean-shape baseline. This benchmark runs the production path --
``mar3d pipeline run --local`` (kfp's local runner: prepare, train VAE / MAR-LR / MAR-HR
with Ray Train + DeepSpeed, evaluate, gate + promote in MLflow, batch generation) --
once per training seed, with the data and its split fixed (the data job is
deterministic) and ``seed`` of every training stage varied, then reads each run's
evaluation report and gate decision and prints, per evaluation group and metric, the
mean ± std (population std over the seeds) of the candidate and of the mean-shape
baseline, the mean difference and in how many seeds the candidate was better.

Each run keeps its own work folder (``WORKDIR/seed-N``: its MLflow database, step logs
and contact sheets); a seed whose report is already there is read, not run again
(``--rerun`` to redo). The first seed prepares the data; the others start from a
hard-linked copy of its prepared dataset (the data job then finds every shard complete
and skips it: ``--resume`` of a run whose data is done), unless ``--prepare-each``.
The table is also written as ``WORKDIR/seeds.md`` and the numbers as
``WORKDIR/seeds.json``.

Examples (from the repository root, venv active):
  python benchmarks/seeds.py                                # tiny preset, seeds 0 1 2
  python benchmarks/seeds.py --preset small --seeds 0 1 2 --workdir outputs/seeds-small
  python benchmarks/seeds.py --workdir outputs/seeds-trained-encoders \
      --set lr:condition.train_encoders=true --set hr:condition.train_encoders=true
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_YCB = Path(os.environ.get("MAR3D_YCB", REPO.parent / "shared" / "datasets" / "ycb"))
METRICS = (("f_score", "F-score@0.05", True), ("chamfer", "Chamfer", False),
           ("normal_consistency", "normal cons.", True), ("retrieval_hits", "retrieval hits", True),
           ("category_accuracy", "category acc.", True), ("diversity_ratio", "diversity", None),
           ("vae_iou", "VAE IoU", None))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    p.add_argument("--preset", default="tiny", help="pipeline preset (default: tiny, the main job)")
    p.add_argument("--dataset", type=Path, default=DEFAULT_YCB, help="meshes (default: the YCB scans)")
    p.add_argument("--workdir", type=Path, default=REPO / "outputs" / "seeds")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--rerun", action="store_true", help="run seeds again even when their report exists")
    p.add_argument("--prepare-each", action="store_true",
                   help="every seed prepares its own data (default: reuse the first seed's)")
    p.add_argument("--data", type=Path, default=None,
                   help="a dataset an earlier run of the same preset prepared (RUN/data): every "
                        "seed starts from a hard-linked copy of it instead of preparing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STEP:KEY=VALUE",
                   help="a config override for one pipeline step (data, vae, lr, hr, eval, generate), "
                        "e.g. lr:condition.train_encoders=true; repeatable")
    return p.parse_args(argv)


STEPS = ("data", "vae", "lr", "hr", "eval", "generate")


def seed_arguments(preset: str, seed: int, overrides: list[str] = ()) -> dict:
    """The preset's pipeline arguments plus ``overrides`` (``step:key=value``) and
    ``seed`` appended to every training stage's overrides (the last override wins)."""
    from pipelines.presets import pipeline_preset

    args = pipeline_preset(preset)
    for item in overrides:
        step, sep, pair = item.partition(":")
        if not sep or step not in STEPS or "=" not in pair:
            raise ValueError(f"--set {item!r} must look like STEP:KEY=VALUE with STEP one of {STEPS}")
        args[f"{step}_overrides"] = list(args.get(f"{step}_overrides", [])) + [pair]
    for stage in ("vae", "lr", "hr"):
        args[f"{stage}_overrides"] = list(args.get(f"{stage}_overrides", [])) + [f"seed={seed}"]
    return args


def latest_run(workdir: Path) -> Path | None:
    """The run folder of the newest finished evaluation under ``workdir``."""
    reports = sorted((workdir / "runs").glob("*/eval/report.json"), key=lambda p: p.stat().st_mtime)
    return reports[-1].parent.parent if reports else None


def linked_data_run(workdir: Path, data: Path | None, seed: int) -> str:
    """A new run folder under ``workdir`` whose ``data`` is a hard-linked copy of the
    prepared dataset ``data``; its id, to resume (None/"": prepare as usual)."""
    if data is None:
        return ""
    run_id = f"seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    target = workdir / "runs" / run_id / "data"
    target.parent.mkdir(parents=True)
    shutil.copytree(data, target, copy_function=os.link)
    return run_id


def run_seed(args, seed: int, data: Path | None = None) -> dict:
    """One pipeline run (or the report an earlier one left): its metrics, gate and time."""
    from pipelines.orchestrate import run_local

    workdir = args.workdir / f"seed-{seed}"
    run = None if args.rerun else latest_run(workdir)
    seconds = None
    if run is None:
        start = time.perf_counter()
        resume = linked_data_run(workdir, data, seed)
        try:
            run_local(args.dataset, workdir, preset=args.preset, num_workers=args.num_workers,
                      extra=seed_arguments(args.preset, seed, args.overrides), resume=resume)
        except Exception as exc:  # noqa: BLE001 - a refused gate still leaves its report
            print(f"seed {seed}: the pipeline stopped: {str(exc).splitlines()[0]}", file=sys.stderr)
        seconds = time.perf_counter() - start
        run = latest_run(workdir)
        if run is None:
            raise RuntimeError(f"seed {seed} left no evaluation report under {workdir}")
    report = json.loads((run / "eval" / "report.json").read_text())
    return {"seed": seed, "run": str(run), "seconds": seconds, "data_reused": data is not None,
            "metrics": report["metrics"],
            # Batch generation runs only after a promotion.
            "promoted": (run / "generate" / "results.parquet").is_file(),
            "reason": gate_reason(run / "promote" / "step.log"),
            "contact_sheets": report.get("contact_sheets", {})}


def gate_reason(step_log: Path) -> str:
    """The gate's verdict lines from the promote step's log (how far from the baseline)."""
    if not step_log.is_file():
        return ""
    verdicts = []
    for line in step_log.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        # A gate table row: metric | better | candidate | baseline | champion | limit | ok | why
        if len(cells) == 8 and "mean-shape baseline" in cells[7]:
            verdicts.append(f"{'ok' if cells[6] == 'yes' else 'NO'} {cells[0]}: {cells[7].split(';')[0]}")
    return "; ".join(dict.fromkeys(verdicts))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def summarize(results: list[dict]) -> list[dict]:
    """Per group and metric: candidate and baseline mean ± std, and wins over seeds."""
    groups = sorted({k.split("/")[0] for r in results for k in r["metrics"]},
                    key=lambda g: ("seen_view", "heldout_objects", "synth_heldout", "all_objects").index(g)
                    if g in ("seen_view", "heldout_objects", "synth_heldout", "all_objects") else 9)
    rows = []
    for group in groups:
        for key, label, higher in METRICS:
            cand = [r["metrics"].get(f"{group}/{key}") for r in results]
            base = [r["metrics"].get(f"{group}/baseline/{key}") for r in results]
            if any(v is None for v in cand):
                continue
            row = {"group": group, "metric": label, "candidate": mean_std(cand),
                   "objects": results[0]["metrics"].get(f"{group}/num_objects")}
            if all(v is not None for v in base) and higher is not None:
                row["baseline"] = mean_std(base)
                row["wins"] = sum((c > b) if higher else (c < b) for c, b in zip(cand, base))
            rows.append(row)
    return rows


def table(rows: list[dict], results: list[dict]) -> str:
    seeds = len(results)
    lines = [f"| group | metric | candidate (mean ± std, {seeds} seeds) | mean-shape baseline | "
             f"candidate better in |", "|---|---|---|---|---|"]
    for row in rows:
        fmt = (lambda m: f"{m[0]:.1f} ± {m[1]:.1f}") if row["metric"] == "retrieval hits" \
            else (lambda m: f"{m[0]:.3f} ± {m[1]:.3f}")
        name = row["group"] + (f" ({int(row['objects'])})" if row["objects"] else "")
        lines.append(f"| {name} | {row['metric']} | {fmt(row['candidate'])} | "
                     + (f"{fmt(row['baseline'])} | {row['wins']}/{seeds} |" if "baseline" in row else "– | – |"))
    lines += ["", "| seed | promoted | minutes | gate |", "|---|---|---|---|"]
    for r in results:
        minutes = f"{r['seconds'] / 60:.1f}" if r["seconds"] else "(earlier run)"
        minutes += " (data reused)" if r.get("data_reused") else ""
        lines.append(f"| {r['seed']} | {r['promoted']} | {minutes} | {r['reason']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        data = args.data or (None if args.prepare_each or not results
                             else Path(results[0]["run"]) / "data")
        results.append(run_seed(args, seed, data))
    rows = summarize(results)
    text = table(rows, results)
    print(text)
    (args.workdir / "seeds.md").write_text(text + "\n")
    (args.workdir / "seeds.json").write_text(json.dumps({"results": results, "summary": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
