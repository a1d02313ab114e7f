"""`mar3d train | evaluate | generate | promote`: the jobs of the model lifecycle."""
from __future__ import annotations

import argparse
import json

from mar3d.cli.common import add_config_args, report_job, write_result
from mar3d.config import load_config


def _cmd_train(args: argparse.Namespace) -> int:
    from mar3d.train import load_train_config, run_training

    cfg = load_train_config(args.stage, args.config, args.overrides)
    result = run_training(cfg)
    out = {"run_id": result.run_id, "model_uri": result.model_uri,
           "checkpoint": str(result.checkpoint_path), "metrics": result.metrics}
    if result.condition_model_uri:
        out["condition_model_uri"] = result.condition_model_uri
    if result.feature_cache:
        out["feature_cache"] = result.feature_cache
    print(json.dumps(out, indent=2, default=str))
    write_result(args, out)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mar3d.evaluate import EvalConfig, evaluate, evaluate_components, evaluation_table

    cfg = load_config(EvalConfig, args.config, args.overrides)
    components = [args.vae_model, args.lr_model, args.hr_model]
    if args.model and any(components):
        raise ValueError("give either --model or --vae-model/--lr-model[/--hr-model], not both")
    if args.compare_to and args.compare_to_champion:
        raise ValueError("give either --compare-to or --compare-to-champion, not both")
    compare_to = args.compare_to
    if args.compare_to_champion:
        from mar3d.registry import RegistryConfig, find_release

        registry = RegistryConfig(name=args.compare_to_champion)
        registry.validate()
        champion = find_release(registry.name, registry.champion_alias, args.tracking_uri)
        compare_to = champion.uri if champion else None
        print(f"comparing with {compare_to}" if champion else
              f"no champion of {registry.name} yet: nothing to compare with")
    if args.model:
        # Scores of a registered release are attached to it, so `mar3d promote` can gate on them.
        release = args.model if args.model.startswith("models:/") and not args.no_record else None
        result = evaluate(args.model, args.dataset, args.output, cfg, tracking_uri=args.tracking_uri,
                          release_uri=release, progress=not args.no_progress, compare_to=compare_to)
    elif args.vae_model and args.lr_model:
        result = evaluate_components(args.vae_model, args.lr_model, args.hr_model, args.dataset,
                                     args.output, cfg, tracking_uri=args.tracking_uri,
                                     progress=not args.no_progress, compare_to=compare_to)
    else:
        raise ValueError("give --model (a release URI or a folder with vae/ lr/ hr/) or "
                         "--vae-model and --lr-model (and optionally --hr-model)")
    print(evaluation_table(result))
    print(f"report: {result.report_path}  MLflow run: {result.run_id}  "
          f"failed objects: {len(result.failed)}")
    for group, path in result.contact_sheets.items():
        print(f"contact sheet {group}: {path}")
    for group, path in result.view_pages.items():
        print(f"3D page {group}: {path}")
    write_result(args, {"metrics": result.metrics, "report_path": str(result.report_path),
                        "run_id": result.run_id, "num_failed": len(result.failed),
                        "contact_sheets": {g: str(p) for g, p in result.contact_sheets.items()},
                        "view_pages": {g: str(p) for g, p in result.view_pages.items()}})
    return 0


def generate_config(args: argparse.Namespace):
    """The GenerateConfig of `mar3d generate` args: --config, --set, then the shortcuts
    (--num-inference-steps, --guidance-scale, --kv-top-k)."""
    from mar3d.generate import GenerateConfig

    overrides = list(args.overrides)
    for key, value in (("pipeline.sampling.num_inference_steps", args.num_inference_steps),
                       ("pipeline.sampling.guidance_scale", args.guidance_scale),
                       ("pipeline.kv_top_k", args.kv_top_k)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(GenerateConfig, args.config, overrides)


def _cmd_generate(args: argparse.Namespace) -> int:
    from mar3d.generate import batch_generate

    cfg = generate_config(args)
    result = batch_generate(args.images, args.model, args.output, cfg,
                            tracking_uri=args.tracking_uri, progress=not args.no_progress)
    return report_job(args, result, result.failed)


def _cmd_promote(args: argparse.Namespace) -> int:
    from mar3d.registry import (PromoteConfig, find_release, get_release, promote, read_eval_report_and_run,
                                record_metrics, register_release)

    cfg = load_config(PromoteConfig, args.config, args.overrides)
    if args.release:
        if any([args.vae_model, args.lr_model, args.hr_model, args.eval_report]):
            raise ValueError("give either --release or --vae-model/--lr-model/--hr-model, not both")
        release = get_release(args.release, args.tracking_uri)
        if args.eval_report:
            release = record_metrics(release, *read_eval_report_and_run(args.eval_report),
                                     tracking_uri=args.tracking_uri)
    else:
        if not (args.vae_model and args.lr_model and args.eval_report):
            raise ValueError("registering a new release needs --vae-model, --lr-model "
                             "(optionally --hr-model) and --eval-report")
        metrics, eval_run_id = read_eval_report_and_run(args.eval_report)  # fail before registering anything
        uris = {"vae": args.vae_model, "lr": args.lr_model}
        if args.hr_model:
            uris["hr"] = args.hr_model
        release = register_release(uris, cfg=cfg.registry, tracking_uri=args.tracking_uri)
        # The evaluation run is recorded too: a release leads back to how it was scored.
        release = record_metrics(release, metrics, eval_run_id, tracking_uri=args.tracking_uri)
    decision = promote(release.uri, gate=cfg.gate, cfg=cfg.registry,
                       reason=args.reason or cfg.reason, tracking_uri=args.tracking_uri)
    champion = find_release(release.name, cfg.registry.champion_alias, args.tracking_uri)
    out = {"promoted": decision.passed, "release_uri": release.uri,
           "champion_uri": champion.uri if champion else None, "gate": decision.table(),
           "metrics": release.metrics}
    print(decision.table())
    print(f"{release.uri}: {'PROMOTED to ' + cfg.registry.champion_alias if decision.passed else 'REFUSED'}"
          f" (champion now {out['champion_uri']})")
    write_result(args, out)
    return 0 if decision.passed else 1


def add_train_command(sub: argparse._SubParsersAction) -> None:
    """`mar3d train {vae,lr,hr}`."""
    train = sub.add_parser(
        "train", help="train a stage (vae, lr, hr) with Ray Train + DeepSpeed",
        description="Train one stage with Ray Train TorchTrainer + DeepSpeed; logs to MLflow, "
                    "checkpoints through ray.train.report and resumes from the latest one.")
    train.add_argument("stage", choices=["vae", "lr", "hr"],
                       help="vae: Pyramid VAE; lr: MAR-LR (image -> LR tokens); "
                            "hr: MAR-HR (image + LR tokens -> HR tokens)")
    add_config_args(train)
    train.set_defaults(func=_cmd_train)


def add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    """`mar3d evaluate`."""
    ev = sub.add_parser(
        "evaluate", help="score generated meshes on held-out views and held-out objects, next to a baseline",
        description="Generate a mesh from the held-out condition view of the objects of a prepared "
                    "dataset and score it against the ground truth (normalized by the GT bounding "
                    "box; see mar3d/metrics.py), per group: seen_view (training objects, unseen "
                    "view) and heldout_objects (objects training never saw). Each group is "
                    "reported next to a constant mean-shape baseline, with top-1 retrieval and "
                    "diversity (does the shape follow its image?). Logs metrics, a per-object "
                    "table, contact sheets and previews to MLflow; writes OUTPUT/report.json.")
    ev.add_argument("--model", help="release (models:/NAME@ALIAS, models:/NAME/VERSION) or a folder with vae/ lr/ [hr/]")
    ev.add_argument("--vae-model", help="VAE (runs:/ID/model, models:/..., or a folder), with --lr-model")
    ev.add_argument("--lr-model", help="MAR-LR model")
    ev.add_argument("--hr-model", help="MAR-HR model (optional: LR-only without it)")
    ev.add_argument("--dataset", "--data", dest="dataset", required=True,
                    help="prepared dataset (output of `mar3d data prepare`)")
    ev.add_argument("--output", required=True, help="folder for report.json, per_object.csv, previews/")
    ev.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    ev.add_argument("--no-record", action="store_true",
                    help="do not attach the metrics to the release given by --model")
    ev.add_argument("--compare-to", default=None, metavar="RELEASE",
                    help="also score this release (e.g. models:/mar3d@champion) on the same objects")
    ev.add_argument("--compare-to-champion", default=None, metavar="NAME",
                    help="also score the champion release of NAME on the same objects, if there "
                         "is one (what the promotion gate compares against)")
    ev.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    add_config_args(ev)
    ev.set_defaults(func=_cmd_evaluate)


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    """`mar3d generate`."""
    gen = sub.add_parser(
        "generate", help="batch image -> mesh generation over a dataset (Ray Data actor pool)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate a mesh per input image with a release. Models load once per Ray "
                    "actor; every input ends as a row of OUTPUT/results.parquet (status ok with "
                    "mesh paths, or error with a reason); re-runs skip finished items.",
        epilog="inputs: a folder of images (png/jpg/webp/bmp/gif/tif; other files get error rows),\n"
               "a Parquet file/folder with a binary 'image' column (+ optional 'id'), or a\n"
               "dataset written by `mar3d data prepare` (one item per object, view view_index).")
    gen.add_argument("--images", "--input", dest="images", required=True,
                     help="image folder, Parquet file/folder, or prepared dataset")
    gen.add_argument("--model", "--model-uri", dest="model", default="models:/mar3d@champion",
                     help="release URI or folder with vae/ lr/ [hr/] (default: models:/mar3d@champion)")
    gen.add_argument("--output", required=True, help="folder for meshes and results.parquet")
    gen.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    gen.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    gen.add_argument("--fail-on-errors", action="store_true",
                     help="exit with status 3 if any input got an error row")
    gen.add_argument("--num-inference-steps", type=int, default=None, metavar="N",
                     help="autoregressive steps of each MAR stage (same as --set "
                          "pipeline.sampling.num_inference_steps=N). Default: the model's own "
                          "(MAR-3D: 64; the tiny models: 16)")
    gen.add_argument("--guidance-scale", type=float, default=None, metavar="S",
                     help="final classifier-free guidance scale, reached by a linear ramp over the "
                          "steps; 1 disables guidance (same as --set pipeline.sampling.guidance_scale=S). "
                          "Default: the model's own (3.0)")
    gen.add_argument("--kv-top-k", type=int, default=None, metavar="K",
                     help="adaptive KV selection in mesh decoding: each block of nearby query points "
                          "attends only to its top K latent tokens (faster, approximate; same as "
                          "--set pipeline.kv_top_k=K; block size and scoring points: "
                          "pipeline.kv_block, pipeline.kv_score_queries). Default: exact")
    add_config_args(gen)
    gen.set_defaults(func=_cmd_generate)


def add_promote_command(sub: argparse._SubParsersAction) -> None:
    """`mar3d promote`."""
    prom = sub.add_parser(
        "promote", help="register a release and move the champion alias if it passes the gate",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Promote a release (VAE + MAR-LR + MAR-HR versions that belong together) "
                    "to the champion alias, only if, on every gate metric of the gate's "
                    "evaluation group, it beats the mean-shape baseline its evaluation scored on "
                    "the same objects (gate.beat_baseline, default true: also for the first "
                    "release of a registry), is no worse than the current champion's (within "
                    "gate.rel_tolerance) and is within the absolute gate.minimums/maximums. "
                    "Every decision is logged as an MLflow run in the 'mar3d-promotions' "
                    "experiment. Exit status 1 when the gate refuses.",
        epilog="examples:\n"
               "  mar3d promote --release models:/mar3d@candidate\n"
               "  mar3d promote --vae-model runs:/ID/model --lr-model runs:/ID/model \\\n"
               "      --hr-model runs:/ID/model --eval-report outputs/eval/report.json \\\n"
               "      --set gate.rel_tolerance=0.02 --set gate.minimums.f_score=0.3\n"
               "  mar3d promote --release models:/mar3d@candidate --set gate.beat_baseline=false"
               "   # a plumbing check only")
    prom.add_argument("--release", help="an existing release: models:/NAME@ALIAS or models:/NAME/VERSION")
    prom.add_argument("--vae-model", help="VAE model (runs:/RUN_ID/model) of a new release")
    prom.add_argument("--lr-model", help="MAR-LR model of a new release")
    prom.add_argument("--hr-model", help="MAR-HR model of a new release (optional)")
    prom.add_argument("--eval-report", help="report.json written by `mar3d evaluate` (its metrics feed the gate)")
    prom.add_argument("--reason", default="", help="why this promotion is attempted (logged)")
    prom.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    add_config_args(prom)
    prom.set_defaults(func=_cmd_promote)
