"""`mar3d cluster up | down`: a Ray cluster on this machine, started the way users start one."""
from __future__ import annotations

import argparse
from pathlib import Path

from mar3d.cli.common import write_result


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


def add_cluster_commands(sub: argparse._SubParsersAction) -> None:
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
