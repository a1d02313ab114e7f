"""The library's command line: thin argument parsing over library functions.

The installed `mar3d` command is this parser plus the deployment layer's `pipeline` and
`ray` commands (pipelines/cli.py), passed in as ``extensions`` so that nothing under
mar3d/ imports pipelines/ or components/.

Every subcommand resolves its typed config (dataclass defaults <- YAML file <- `--set`
overrides), calls one library function and prints a short summary. Heavy imports
happen inside the handlers so `mar3d --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Iterable

from mar3d import __version__, logs
from mar3d.config import ConfigError, dump_yaml, load_config, to_dict

EXAMPLES = """\
examples:
  mar3d data prepare --input ../shared/datasets/ycb --output outputs/data
  mar3d data prepare --input meshes.jsonl --output outputs/data --config data \\
      --set render.num_views=4 --set surface_sizes=[8192,2048,512]
  mar3d train vae --config train_vae_tiny --set data=outputs/data
  mar3d config show train --config train_vae_paper
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-json", type=Path, default=None, metavar="PATH",
                   help="also write the command's result as a JSON object to PATH "
                        "(used by the Kubeflow components to chain steps)")
    p.add_argument("--config", default=None, metavar="FILE_OR_PRESET",
                   help="YAML file with config values (unknown keys are errors), or the name of "
                        "a shipped preset, e.g. train_vae_tiny (see `mar3d config presets`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, dotted keys, YAML values "
                        "(e.g. --set num_workers=2 --set render.elevations=[20,-10]); repeatable")


def write_result(args: argparse.Namespace, result: dict) -> None:
    path = getattr(args, "result_json", None)
    if path is not None:
        from mar3d import storage

        storage.write_bytes(path, json.dumps(result, indent=2, default=str).encode())


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from mar3d.data.config import DataConfig
    from mar3d.data.prepare import prepare_dataset

    cfg = load_config(DataConfig, args.config, args.overrides)
    if args.num_workers is not None:
        cfg.num_workers = args.num_workers
    _apply_selection_flags(cfg, args)
    cfg.validate()
    result = prepare_dataset(args.input, args.output, cfg, progress=not args.no_progress)
    return _report_job(args, result, result.num_errors)


def _apply_selection_flags(cfg, args: argparse.Namespace) -> None:
    """--categories / --uids / --limit into the DataConfig's select_* fields (where a
    pipeline sets them with --set); the uid file as an absolute path, so the manifest's
    config says which file it was."""
    if args.categories is not None:
        cfg.select_categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    if args.uids is not None:
        from mar3d import storage

        cfg.select_uids_file = args.uids if storage.is_remote(args.uids) else str(Path(args.uids).absolute())
    if args.limit is not None:
        cfg.select_limit = args.limit


def _report_job(args: argparse.Namespace, result, failed: int) -> int:
    """Summary and result JSON of a data job; exit status 3 for ``--fail-on-errors``
    when ``failed`` inputs became error rows."""
    print(result.summary())
    write_result(args, result.to_dict())
    return 3 if args.fail_on_errors and failed else 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from mar3d.data.synth import SynthConfig, synthesize

    cfg = load_config(SynthConfig, args.config, args.overrides)
    for name, value in (("num_objects", args.num), ("seed", args.seed), ("photo_dir", args.photo_dir),
                        ("workers", args.workers)):
        if value is not None:
            setattr(cfg, name, value)
    if args.categories is not None:
        cfg.categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    try:
        cfg.validate()
    except ValueError as e:
        raise SystemExit(f"mar3d data synth: {e}") from None
    result = synthesize(args.output, cfg, progress=not args.no_progress)
    print(result.summary())
    write_result(args, {"output": result.output, "num_objects": result.num_objects,
                        "categories": result.categories, "seconds": result.seconds})
    return 0


def _cmd_data_cache(args: argparse.Namespace) -> int:
    from mar3d.train.feature_cache import FeatureCacheConfig, build_feature_cache

    cfg = load_config(FeatureCacheConfig, args.config, args.overrides)
    for name in ("num_subsets", "dtype", "num_workers"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    result = build_feature_cache(args.data, args.output, args.condition_model, args.vae_model, cfg,
                                 tracking_uri=args.tracking_uri, progress=not args.no_progress)
    return _report_job(args, result, result.errors)


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
    write_result(args, {"metrics": result.metrics, "report_path": str(result.report_path),
                        "run_id": result.run_id, "num_failed": len(result.failed),
                        "contact_sheets": {g: str(p) for g, p in result.contact_sheets.items()}})
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
    return _report_job(args, result, result.failed)


def _cmd_promote(args: argparse.Namespace) -> int:
    from mar3d.registry import (PromoteConfig, find_release, get_release, promote,
                                read_eval_report, record_metrics, register_release)

    cfg = load_config(PromoteConfig, args.config, args.overrides)
    if args.release:
        if any([args.vae_model, args.lr_model, args.hr_model, args.eval_report]):
            raise ValueError("give either --release or --vae-model/--lr-model/--hr-model, not both")
        release = get_release(args.release, args.tracking_uri)
        if args.eval_report:
            release = record_metrics(release, read_eval_report(args.eval_report), tracking_uri=args.tracking_uri)
    else:
        if not (args.vae_model and args.lr_model and args.eval_report):
            raise ValueError("registering a new release needs --vae-model, --lr-model "
                             "(optionally --hr-model) and --eval-report")
        metrics = read_eval_report(args.eval_report)  # fail before registering anything
        uris = {"vae": args.vae_model, "lr": args.lr_model}
        if args.hr_model:
            uris["hr"] = args.hr_model
        release = register_release(uris, cfg=cfg.registry, tracking_uri=args.tracking_uri)
        release = record_metrics(release, metrics, tracking_uri=args.tracking_uri)
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


def _cmd_cluster_up(args: argparse.Namespace) -> int:
    from mar3d import cluster

    started = cluster.up(args.nodes, args.state_dir or cluster.DEFAULT_STATE_DIR,
                         cpus_per_node=args.cpus_per_node, object_store_mb=args.object_store_mb)
    print(started.summary())
    write_result(args, {"dashboard_url": started.dashboard_url, "gcs_address": started.gcs_address,
                        "state_dir": started.state_dir, **started.client_env()})
    return 0


def _cmd_cluster_down(args: argparse.Namespace) -> int:
    from mar3d import cluster

    state_dir = args.state_dir or cluster.DEFAULT_STATE_DIR
    stopped = cluster.down(state_dir)
    print(f"stopped the local cluster of {state_dir} ({stopped} processes)")
    write_result(args, {"stopped_processes": stopped})
    return 0


def _config_classes() -> dict[str, tuple[str, str]]:
    # name -> (module, class); resolved lazily so one missing optional stage
    # does not break `config show` for the others.
    return {
        "data": ("mar3d.data.config", "DataConfig"),
        "synth": ("mar3d.data.synth", "SynthConfig"),
        "vae": ("mar3d.models.vae", "VAEConfig"),
        "mar": ("mar3d.models.mar", "MARConfig"),
        "condition": ("mar3d.models.condition", "ConditionConfig"),
        "train": ("mar3d.train.config", "TrainConfig"),
        "cache": ("mar3d.train.feature_cache", "FeatureCacheConfig"),
        "promote": ("mar3d.registry", "PromoteConfig"),
        "evaluate": ("mar3d.evaluate", "EvalConfig"),
        "generate": ("mar3d.generate", "GenerateConfig"),
    }


def _cmd_config_show(args: argparse.Namespace) -> int:
    import importlib

    module, cls_name = _config_classes()[args.name]
    cls = getattr(importlib.import_module(module), cls_name)
    cfg = load_config(cls, args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    write_result(args, {"config": to_dict(cfg)})
    return 0


def _cmd_config_presets(args: argparse.Namespace) -> int:
    from mar3d.config import PIPELINE_PRESET_DIR, pipeline_presets, preset_path, presets

    for name in presets():
        print(f"{name:<16} {preset_path(name)}")
    # Whole-pipeline sizes: parameters of `mar3d pipeline run|submit --preset NAME`.
    for name in pipeline_presets():
        print(f"{'pipeline ' + name:<16} {PIPELINE_PRESET_DIR / name}.yaml")
    return 0


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """`mar3d data prepare`, `mar3d data cache`."""
    data = sub.add_parser("data", help="dataset jobs (mesh -> Parquet shards)",
                          description="Dataset jobs.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prep = data_sub.add_parser(
        "prepare", help="meshes -> watertight, multi-scale points, occupancy, renders -> Parquet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the Ray Data preparation job. Every input mesh ends as a row in a "
                    "shard or as a row in OUTPUT/errors.parquet with a reason; re-running on "
                    "the same OUTPUT skips meshes already in complete shards.",
        epilog="Input formats: GLB/GLTF/OBJ(+MTL, textures)/PLY/STL, found recursively in DIR,\n"
               "or listed in a manifest (.json list, .jsonl with a 'path' key, .csv with a\n"
               "'path' column, or .txt one path per line; relative paths resolve against the\n"
               "manifest's folder and may not escape it).\n"
               "Objaverse: an Objaverse 1.0 tree (its folder or its object-paths.json[.gz]; with\n"
               "lvis-annotations.json.gz and metadata/*.json.gz when present), or an Objaverse-XL\n"
               "table (.parquet, or .csv with fileIdentifier, sha256, source, license and\n"
               "local_path, the file relative to the table's folder). Their rows keep source_uid,\n"
               "category, name, license and source; --categories/--uids/--limit select from them:\n"
               "  mar3d data prepare --input ~/.objaverse/hf-objaverse-v1 --output outputs/data \\\n"
               "      --categories chair,table --limit 200\n"
               "Frames: render_up_axis is the dataset's up (y: glTF/Objaverse, z: YCB scans);\n"
               "glTF files (+Y up by specification) are turned into a z-up dataset, other formats\n"
               "are taken as they are. A procedural corpus mixed in (--set synth_objects=N) is\n"
               "made in OUTPUT/corpus once:\n"
               "  mar3d data prepare --input ../shared/datasets/ycb --output outputs/data \\\n"
               "      --config data_local --set synth_objects=1000")
    prep.add_argument("--input", required=True, action="append",
                      help="directory of meshes, a manifest file, an Objaverse tree or an Objaverse-XL "
                           "table; repeat it to make one dataset of several (e.g. scans and a "
                           "`mar3d data synth` corpus: give them the same up axis, see render_up_axis)")
    prep.add_argument("--output", required=True, help="output directory (shards, manifest.json, errors.parquet)")
    prep.add_argument("--num-workers", type=int, default=None,
                      help="parallel Ray tasks (default: config num_workers)")
    prep.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    prep.add_argument("--fail-on-errors", action="store_true",
                      help="exit with status 3 if any input mesh was rejected")
    prep.add_argument("--categories", default=None, metavar="A,B",
                      help="Objaverse tree: only objects of these LVIS categories (comma-separated; "
                           "config select_categories)")
    prep.add_argument("--uids", default=None, metavar="FILE",
                      help="only these source uids (Objaverse uids or XL fileIdentifiers), one per "
                           "line; a uid the input lacks becomes a not_found error row (config select_uids_file)")
    prep.add_argument("--limit", type=int, default=None, metavar="N",
                      help="at most N objects: the first N selected uids in sorted order (config select_limit)")
    _add_config_args(prep)
    prep.set_defaults(func=_cmd_data_prepare)
    _add_data_cache_command(data_sub)
    _add_data_synth_command(data_sub)


def _add_data_synth_command(data_sub: argparse._SubParsersAction) -> None:
    from mar3d.data.synth import CATEGORIES

    synth = data_sub.add_parser(
        "synth", help="write a procedural corpus of textured objects in the Objaverse 1.0 layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Make NUM textured, watertight everyday objects (lathe bodies, extrusions, "
                    "compositions) with random proportions, colours and image textures, and "
                    "write them as OUTPUT/glbs/000-NNN/<uid>.glb with object-paths.json.gz, "
                    "lvis-annotations.json.gz (category -> uids) and metadata/000-NNN.json.gz, "
                    "the layout `mar3d data prepare --input OUTPUT` reads. Object i of a seed is "
                    "the same file on every run, so a larger --num grows a corpus without "
                    "changing what it had.",
        epilog="Categories (family):\n  " + "\n  ".join(
            f"{name} ({family})" for name, (family, _) in sorted(CATEGORIES.items())))
    synth.add_argument("--output", required=True, help="folder to write the corpus to")
    synth.add_argument("--num", type=int, default=None, help="number of objects (default: config num_objects, 1000)")
    synth.add_argument("--seed", type=int, default=None, help="corpus seed (default: config seed, 0)")
    synth.add_argument("--categories", default=None,
                       help="comma-separated categories to make (default: all); objects cycle through them")
    synth.add_argument("--photo-dir", default=None,
                       help="folder of PNG/JPG images to cut photo textures from (e.g. scan texture maps)")
    synth.add_argument("--workers", type=int, default=None, help="processes (default: one per CPU)")
    synth.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    _add_config_args(synth)
    synth.set_defaults(func=_cmd_data_synth)


def _add_data_cache_command(data_sub: argparse._SubParsersAction) -> None:
    cache = data_sub.add_parser(
        "cache", help="frozen image-encoder features + VAE posteriors of a dataset -> Parquet (MAR training cache)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the frozen image encoder over every stored view and the frozen VAE over "
                    "N fixed point subsets of every object of a prepared dataset (a Ray Data job, "
                    "one actor per worker loading both models once) and write Parquet shards, "
                    "OUTPUT/manifest.json (which conditioner, VAE, dataset content, surface sizes) "
                    "and OUTPUT/errors.parquet (objects that failed). MAR training reads it with "
                    "--set feature_cache=OUTPUT and refuses a cache made from other inputs.",
        epilog="example:\n"
               "  mar3d data cache --data outputs/data --output outputs/cache \\\n"
               "      --condition-model runs:/LR_RUN/conditioner --vae-model runs:/VAE_RUN/model\n"
               "  mar3d train lr --config train_lr_tiny --set feature_cache=outputs/cache ...\n"
               "surface sizes: --set surface_sizes=[...] must equal the training run's (default:\n"
               "as stored in the dataset).")
    cache.add_argument("--data", required=True, help="prepared dataset (output of `mar3d data prepare`)")
    cache.add_argument("--output", required=True, help="cache folder (shards, manifest.json, errors.parquet)")
    cache.add_argument("--condition-model", required=True,
                       help="the frozen image encoder (a 'cond' model: runs:/RUN/conditioner, models:/.., "
                            "or a folder): the one the MAR run uses")
    cache.add_argument("--vae-model", required=True, help="the frozen VAE (runs:/RUN/model, models:/.., or a folder)")
    cache.add_argument("--subsets", dest="num_subsets", type=int, default=None,
                       help="fixed point subsets encoded per object (default: config num_subsets, 4)")
    cache.add_argument("--dtype", choices=["float16", "float32"], default=None,
                       help="storage type of the encoder features (default float16; latents stay float32)")
    cache.add_argument("--num-workers", type=int, default=None, help="encoder actors (default: config num_workers)")
    cache.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ URIs")
    cache.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    cache.add_argument("--fail-on-errors", action="store_true",
                       help="exit with status 3 if any object could not be encoded")
    _add_config_args(cache)
    cache.set_defaults(func=_cmd_data_cache)


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """`mar3d train {vae,lr,hr}`."""
    train = sub.add_parser(
        "train", help="train a stage (vae, lr, hr) with Ray Train + DeepSpeed",
        description="Train one stage with Ray Train TorchTrainer + DeepSpeed; logs to MLflow, "
                    "checkpoints through ray.train.report and resumes from the latest one.")
    train.add_argument("stage", choices=["vae", "lr", "hr"],
                       help="vae: Pyramid VAE; lr: MAR-LR (image -> LR tokens); "
                            "hr: MAR-HR (image + LR tokens -> HR tokens)")
    _add_config_args(train)
    train.set_defaults(func=_cmd_train)


def _add_evaluate_command(sub: argparse._SubParsersAction) -> None:
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
    _add_config_args(ev)
    ev.set_defaults(func=_cmd_evaluate)


def _add_generate_command(sub: argparse._SubParsersAction) -> None:
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
    _add_config_args(gen)
    gen.set_defaults(func=_cmd_generate)


def _add_promote_command(sub: argparse._SubParsersAction) -> None:
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
    _add_config_args(prom)
    prom.set_defaults(func=_cmd_promote)


def _add_cluster_commands(sub: argparse._SubParsersAction) -> None:
    """`mar3d cluster up/down`."""
    cluster = sub.add_parser("cluster", help="a real multi-node Ray cluster on this machine",
                             description="Start/stop a local Ray cluster: `ray start --head` with "
                                         "the dashboard and Jobs API on 127.0.0.1, plus worker "
                                         "nodes joined with `ray start --address`, each with its "
                                         "own ports, temp dir and custom resource mar3d_node_<i>.")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="SUBCOMMAND")
    cup = cluster_sub.add_parser("up", help="start a head and N-1 worker nodes here")
    cup.add_argument("--local", action="store_true", required=True,
                     help="required: the nodes run on this machine (for a real cluster see k8s/)")
    cup.add_argument("--nodes", type=int, default=2, help="nodes including the head (default 2)")
    cup.add_argument("--cpus-per-node", type=int, default=None,
                     help="logical CPUs each node offers (default: this machine's cores / nodes, at least 1)")
    cup.add_argument("--object-store-mb", type=int, default=512, help="object store per node (MiB)")
    cup.add_argument("--state-dir", type=Path, default=None,
                     help="where the cluster's description and auth token live "
                          "(default: $MAR3D_CLUSTER_DIR or ~/.cache/mar3d/cluster)")
    cup.add_argument("--result-json", type=Path, default=None, metavar="PATH", help=argparse.SUPPRESS)
    cup.set_defaults(func=_cmd_cluster_up)
    cdown = cluster_sub.add_parser("down", help="stop the cluster started by `cluster up`")
    cdown.add_argument("--state-dir", type=Path, default=None, help="as given to `cluster up`")
    cdown.add_argument("--result-json", type=Path, default=None, metavar="PATH", help=argparse.SUPPRESS)
    cdown.set_defaults(func=_cmd_cluster_down)


def _add_config_commands(sub: argparse._SubParsersAction) -> None:
    """`mar3d config show|presets`."""
    config = sub.add_parser("config", help="inspect configs",
                            description="Print a resolved config as YAML.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print defaults (+ --config/--set) as YAML")
    show.add_argument("name", choices=sorted(_config_classes()))
    _add_config_args(show)
    show.set_defaults(func=_cmd_config_show)
    listing = config_sub.add_parser("presets", help="list the shipped presets (names for --config)")
    listing.set_defaults(func=_cmd_config_presets)


def build_parser(extensions: Iterable[Callable[[argparse._SubParsersAction], None]] = ()
                 ) -> argparse.ArgumentParser:
    """The library's commands, plus those each of ``extensions`` adds (the deployment
    layer's `pipeline` and `ray` commands, see pipelines/cli.py: the library never
    imports the layers built on it)."""
    parser = argparse.ArgumentParser(
        prog="mar3d",
        description="MAR-3D image-to-3D: data preparation, Pyramid VAE and MAR-LR/HR training "
                    "on Ray Train + DeepSpeed, MLflow tracking.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mar3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show everything the job and its libraries print (debug logging)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add_commands in (_add_data_commands, _add_train_command, _add_evaluate_command,
                         _add_generate_command, _add_promote_command, *extensions,
                         _add_cluster_commands, _add_config_commands):
        add_commands(sub)
    _accept_verbose_after_commands(parser)
    return parser


def _accept_verbose_after_commands(parser: argparse.ArgumentParser) -> None:
    """`mar3d pipeline run ... --verbose` as well as `mar3d --verbose pipeline run ...`
    (SUPPRESS: a command that is not given it keeps the top-level value)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                                     help="show everything the job and its libraries print")
                _accept_verbose_after_commands(command)


def main(argv: list[str] | None = None,
         extensions: Iterable[Callable[[argparse._SubParsersAction], None]] = ()) -> int:
    parser = build_parser(extensions)
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mar3d: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"mar3d: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        # Library errors with a message meant for the user (registry refusals, failed
        # training runs, failed pipeline steps); anything else keeps its traceback.
        if type(e).__name__ not in {"RegistryError", "TrainingError", "TrackingError", "StepFailed",
                                    "ClusterError"}:
            raise
        print(f"mar3d: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
