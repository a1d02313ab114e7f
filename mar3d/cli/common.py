"""What every command shares: the config flags, the result file, the exit status of a job."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_result_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-json", type=Path, default=None, metavar="PATH",
                   help="also write the command's result as a JSON object to PATH "
                        "(used by the Kubeflow components to chain steps)")


def add_config_args(p: argparse.ArgumentParser) -> None:
    add_result_arg(p)
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


def report_job(args: argparse.Namespace, result, failed: int) -> int:
    """Summary and result JSON of a data job; exit status 3 for ``--fail-on-errors``
    when ``failed`` inputs became error rows."""
    print(result.summary())
    write_result(args, result.to_dict())
    return 3 if args.fail_on_errors and failed else 0
