"""The library's command line: thin argument parsing over library functions.

The installed `mar3d` command is this parser plus the deployment layer's `pipeline` and
`ray` commands (pipelines/cli.py), passed in as ``extensions`` so that nothing under
mar3d/ imports pipelines/ or components/.

Every subcommand resolves its typed config (dataclass defaults <- YAML file <- `--set`
overrides), calls one library function and prints a short summary. Heavy imports
happen inside the handlers so `mar3d --help` stays fast. One module per command group:
``data`` (prepare, synth, cache), ``jobs`` (train, evaluate, generate, promote),
``view``, ``cluster``, ``tracking`` and ``config``; ``common`` holds the flags and result file they share.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable

from mar3d import __version__, logs
from mar3d.cli.cluster import add_cluster_commands
from mar3d.cli.common import add_config_args, write_result
from mar3d.cli.config import add_config_commands
from mar3d.cli.data import add_data_commands
from mar3d.cli.jobs import (add_evaluate_command, add_generate_command, add_promote_command,
                            add_train_command, generate_config)
from mar3d.cli.tracking import add_tracking_commands
from mar3d.cli.view import add_view_command
from mar3d.config import ConfigError

__all__ = ["add_config_args", "build_parser", "generate_config", "main", "write_result"]

EXAMPLES = """\
examples:
  mar3d data prepare --input ../shared/datasets/ycb --output outputs/data
  mar3d data prepare --input meshes.jsonl --output outputs/data --config data \\
      --set render.num_views=4 --set surface_sizes=[8192,2048,512]
  mar3d train vae --config train_vae_tiny --set data=outputs/data
  mar3d config show train --config train_vae_paper
"""


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

    for add_commands in (add_data_commands, add_train_command, add_evaluate_command,
                         add_generate_command, add_promote_command, add_view_command, *extensions,
                         add_cluster_commands, add_tracking_commands, add_config_commands):
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
