"""`mar3d tracking add-user`: accounts of an MLflow server with authentication."""
from __future__ import annotations

import argparse
import os

from mar3d.cli.common import add_result_arg, write_result


def _cmd_add_user(args: argparse.Namespace) -> int:
    from mar3d import tracking

    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        raise ValueError("add-user needs the server's http(s) URL (--tracking-uri or MLFLOW_TRACKING_URI)")
    password = os.environ.get(tracking.USER_PASSWORD_ENV, "")
    if not password:
        raise ValueError(f"set the new account's password in {tracking.USER_PASSWORD_ENV} "
                         "(never on the command line, where process listings show it)")
    created = tracking.ensure_user(uri, args.username, password)
    print(f"{'created' if created else 'updated the password of'} MLflow user {args.username!r} at {uri}")
    write_result(args, {"username": args.username, "created": created})
    return 0


def add_tracking_commands(sub: argparse._SubParsersAction) -> None:
    tracking = sub.add_parser("tracking", help="MLflow server administration")
    tracking_sub = tracking.add_subparsers(dest="tracking_command", required=True, metavar="COMMAND")
    add = tracking_sub.add_parser(
        "add-user", help="create an account (or set its password) on an MLflow server with authentication",
        description="Acts as the server's admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD); "
                    "the new account's password is read from MAR3D_USER_PASSWORD. A new account may "
                    "read what the server's default_permission allows and manage what it creates "
                    "(the pipeline's account creates the experiments and registered models, so only "
                    "it, and the admin, move the registry's aliases).")
    add.add_argument("username")
    add.add_argument("--tracking-uri", default=None, help="server URL (default: $MLFLOW_TRACKING_URI)")
    add_result_arg(add)
    add.set_defaults(func=_cmd_add_user)
