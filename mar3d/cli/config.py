"""`mar3d config show | presets`: the typed configs and the shipped presets."""
from __future__ import annotations

import argparse
import sys

from mar3d.cli.common import add_config_args, write_result
from mar3d.config import dump_yaml, load_config, to_dict


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


def add_config_commands(sub: argparse._SubParsersAction) -> None:
    """`mar3d config show|presets`."""
    config = sub.add_parser("config", help="inspect configs",
                            description="Print a resolved config as YAML.")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_sub.add_parser("show", help="print defaults (+ --config/--set) as YAML")
    show.add_argument("name", choices=sorted(_config_classes()))
    add_config_args(show)
    show.set_defaults(func=_cmd_config_show)
    listing = config_sub.add_parser("presets", help="list the shipped presets (names for --config)")
    listing.set_defaults(func=_cmd_config_presets)
