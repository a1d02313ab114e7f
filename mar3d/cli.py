"""The `mar3d` command line: thin argument parsing over library functions.

Every subcommand resolves its typed config (dataclass defaults <- YAML file <- `--set`
overrides), calls one library function and prints a short summary. Heavy imports
happen inside the handlers so `mar3d --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mar3d import __version__
from mar3d.config import ConfigError, dump_yaml, load_config

EXAMPLES = """\
examples:
  mar3d data prepare --input ../shared/datasets/ycb --output outputs/data
  mar3d data prepare --input meshes.jsonl --output outputs/data --config configs/data.yaml \\
      --set render.num_views=4 --set surface_sizes=[8192,2048,512]
  mar3d train vae --config configs/train_vae_tiny.yaml --set data=outputs/data
  mar3d config show data
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-json", type=Path, default=None, metavar="PATH",
                   help="also write the command's result as a JSON object to PATH "
                        "(used by the Kubeflow components to chain steps)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file with config values (unknown keys are errors)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, dotted keys, YAML values "
                        "(e.g. --set num_workers=2 --set render.elevations=[20,-10]); repeatable")


def _write_result(args: argparse.Namespace, result: dict) -> None:
    path = getattr(args, "result_json", None)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from mar3d.data.config import DataConfig
    from mar3d.data.prepare import prepare_dataset

    cfg = load_config(DataConfig, args.config, args.overrides)
    if args.num_workers is not None:
        cfg.num_workers = args.num_workers
        cfg.validate()
    result = prepare_dataset(args.input, args.output, cfg, progress=not args.no_progress)
    print(result.summary())
    _write_result(args, result.to_dict())
    if args.fail_on_errors and result.num_errors:
        return 3
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mar3d.train import load_train_config, run_training

    cfg = load_train_config(args.stage, args.config, args.overrides)
    result = run_training(cfg)
    out = {"run_id": result.run_id, "model_uri": result.model_uri,
           "checkpoint": str(result.checkpoint_path), "metrics": result.metrics}
    print(json.dumps(out, indent=2, default=str))
    _write_result(args, out)
    return 0


def _config_classes() -> dict[str, tuple[str, str]]:
    # name -> (module, class); resolved lazily so one missing optional stage
    # does not break `config show` for the others.
    return {
        "data": ("mar3d.data.config", "DataConfig"),
        "vae": ("mar3d.models.vae", "VAEConfig"),
        "mar": ("mar3d.models.mar", "MARConfig"),
        "condition": ("mar3d.models.condition", "ConditionConfig"),
        "train": ("mar3d.train.config", "TrainConfig"),
    }


def _cmd_config_show(args: argparse.Namespace) -> int:
    import importlib

    module, cls_name = _config_classes()[args.name]
    cls = getattr(importlib.import_module(module), cls_name)
    cfg = load_config(cls, args.config, args.overrides)
    sys.stdout.write(dump_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mar3d",
        description="MAR-3D image-to-3D: data preparation, Pyramid VAE and MAR-LR/HR training "
                    "on Ray Train + DeepSpeed, MLflow tracking.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mar3d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
               "manifest's folder and may not escape it).")
    prep.add_argument("--input", required=True, help="directory of meshes or a manifest file")
    prep.add_argument("--output", required=True, help="output directory (shards, manifest.json, errors.parquet)")
    prep.add_argument("--num-workers", type=int, default=None,
                      help="parallel Ray tasks (default: config num_workers)")
    prep.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    prep.add_argument("--fail-on-errors", action="store_true",
                      help="exit with status 3 if any input mesh was rejected")
    _add_config_args(prep)
    prep.set_defaults(func=_cmd_data_prepare)

    train = sub.add_parser(
        "train", help="train a stage (vae, lr, hr) with Ray Train + DeepSpeed",
        description="Train one stage with Ray Train TorchTrainer + DeepSpeed; logs to MLflow, "
                    "checkpoints through ray.train.report and resumes from the latest one.")
    train.add_argument("stage", choices=["vae", "lr", "hr"],
                       help="vae: Pyramid VAE; lr: MAR-LR (image -> LR tokens); "
                            "hr: MAR-HR (image + LR tokens -> HR tokens)")
    _add_config_args(train)
    train.set_defaults(func=_cmd_train)

    config = sub.add_parser("config", help="inspect configs",
                            description="Print a resolved config as YAML.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print defaults (+ --config/--set) as YAML")
    show.add_argument("name", choices=sorted(_config_classes()))
    _add_config_args(show)
    show.set_defaults(func=_cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"mar3d: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"mar3d: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
