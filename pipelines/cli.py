"""The full `mar3d` command: the library's commands (mar3d/cli/) plus the deployment
layer's `pipeline` (compile, run locally or on a Ray cluster, submit to Kubeflow) and
`ray submit`.

They live here, not in mar3d/, because they drive the Kubeflow pipeline and its
components, which themselves run library commands: the library never imports this layer.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mar3d.cli import main as library_main, write_result


def _cmd_pipeline_compile(args: argparse.Namespace) -> int:
    from pipelines.orchestrate import compile_pipeline

    path = compile_pipeline(args.output)
    print(f"compiled pipeline IR: {path}")
    write_result(args, {"path": str(path)})
    return 0


def _cmd_pipeline_run(args: argparse.Namespace) -> int:
    from pipelines.orchestrate import parse_pipeline_arguments, run_local
    from pipelines.presets import check_arguments

    extra = check_arguments(parse_pipeline_arguments(args.arg))
    if args.feature_cache:
        extra["feature_cache"] = True
    if args.local == bool(args.ray_address):
        raise ValueError("`mar3d pipeline run` needs exactly one of --local (every step on this "
                         "machine) or --ray-address URL (every step as a Ray job on that cluster); "
                         "use `mar3d pipeline submit --host URL` for Kubeflow Pipelines")
    result = run_local(args.dataset, args.workdir, mlflow_uri=args.mlflow_uri, preset=args.preset,
                       model_name=args.model_name, gate_max_chamfer=args.gate_max_chamfer,
                       gate_min_fscore=args.gate_min_fscore,
                       gate_beat_baseline=args.gate_baseline, num_workers=args.num_workers,
                       ray_address=args.ray_address or "", resume=args.resume or "",
                       extra=extra, verbose=args.verbose)
    print(result.summary())
    write_result(args, result.to_dict())
    return 0


def _cmd_pipeline_submit(args: argparse.Namespace) -> int:
    from pipelines.orchestrate import parse_pipeline_arguments, submit_pipeline
    from pipelines.presets import pipeline_preset

    arguments = {**pipeline_preset(args.preset), **parse_pipeline_arguments(args.arg)}
    run_id = submit_pipeline(args.host, arguments, experiment=args.experiment,
                             package=args.package, namespace=args.namespace)
    print(f"submitted pipeline run {run_id} to {args.host}")
    write_result(args, {"run_id": run_id})
    return 0


def _cmd_ray_submit(args: argparse.Namespace) -> int:
    from pipelines.orchestrate import submit_ray_stage

    argv = list(args.command_argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ValueError("give the stage to run after --, e.g. -- mar3d train vae --config ...")
    result = submit_ray_stage(args.address, argv)
    print(json.dumps(result, indent=2, default=str))
    write_result(args, result)
    return 0


def _default_ycb() -> str | None:
    # The checkout's sibling ../shared/datasets/ycb: the real meshes of the local demo. A
    # dev-checkout convenience only: an installed package has no such sibling (None).
    parents = Path(__file__).resolve().parents
    path = parents[2] / "shared" / "datasets" / "ycb" if len(parents) > 2 else None
    return str(path) if path is not None and path.is_dir() else None


PRESET_HELP = ("pipeline preset (mar3d/configs/pipeline/): tiny: the local demo on CPU; small: the "
               "same models trained 3.5x longer; smoke: the smallest run (CI), a plumbing check of 4 "
               "objects and a few steps, promoted without the gate's mean-shape baseline floor; "
               "paper: the paper's models on a GPU cluster")


def add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """`mar3d pipeline compile|run|submit`."""
    from pipelines.presets import pipeline_presets

    pipe = sub.add_parser("pipeline", help="the Kubeflow pipeline: compile, run locally, submit",
                          description="prepare -> train_vae -> train_lr -> train_hr -> evaluate -> "
                                      "promote -> batch_generate, as a kfp v2 pipeline.")
    pipe_sub = pipe.add_subparsers(dest="pipeline_command", required=True, metavar="SUBCOMMAND")
    comp = pipe_sub.add_parser("compile", help="write the pipeline IR YAML")
    comp.add_argument("--output", type=Path, default=None,
                      help="where to write it (default: pipelines/mar3d_pipeline.yaml)")
    comp.add_argument("--result-json", type=Path, default=None, metavar="PATH", help=argparse.SUPPRESS)
    comp.set_defaults(func=_cmd_pipeline_compile)
    run = pipe_sub.add_parser(
        "run", help="run the whole pipeline with kfp's local runner: steps here or on a Ray cluster",
        description="Run the same pipeline a cluster runs, with kfp's SubprocessRunner. --local: "
                    "local Ray for the heavy steps; --ray-address: every step is a Ray job on that "
                    "cluster (Kubeflow not needed). MLflow in WORKDIR/mlflow.db (or --mlflow-uri), "
                    "tiny randomly initialised image encoders (no pretrained weights are downloaded).",
        epilog="examples:\n  mar3d pipeline run --local --workdir outputs/pipeline\n"
               "  mar3d cluster up --local --nodes 2   # prints the address and token variables\n"
               "  mar3d pipeline run --ray-address http://127.0.0.1:PORT --workdir outputs/cluster-run "
               "--mlflow-uri http://127.0.0.1:5000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--local", action="store_true", help="run every step on this machine")
    run.add_argument("--ray-address", default=None, metavar="URL",
                     help="submit every step as a Ray job to this cluster's Jobs API "
                          "(http://HEAD:8265); the work folder and dataset must be reachable from "
                          "its nodes")
    ycb = _default_ycb()
    run.add_argument("--dataset", default=ycb, required=ycb is None,
                     help="folder of meshes or a manifest (default: ../shared/datasets/ycb next to "
                          "the checkout, when present)")
    run.add_argument("--workdir", default="outputs/pipeline", help="where everything is written")
    run.add_argument("--mlflow-uri", default=None,
                     help="MLflow tracking URI (default: sqlite:///WORKDIR/mlflow.db)")
    run.add_argument("--preset", default="tiny", choices=pipeline_presets(),
                     help=f"{PRESET_HELP} (default: tiny)")
    run.add_argument("--num-workers", type=int, default=None,
                     help="Ray Train workers per training stage (default: the preset's; tiny: 2 with "
                          "fractional CPUs, so they fit on 2 cores)")
    run.add_argument("--resume", default=None, metavar="RUN_ID",
                     help="continue an earlier run of this work folder (its id is printed when it "
                          "fails): finished data shards are skipped, training resumes from checkpoints")
    run.add_argument("--feature-cache", action="store_true",
                     help="MAR-LR first builds a feature/latent cache (frozen encoder features + VAE "
                          "posteriors, Parquet) into its run folder and MAR-LR/HR train from it")
    run.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                     help="set one pipeline parameter over the preset's (repeatable; the value is JSON "
                          "when it parses), e.g. --arg 'vae_overrides=[\"steps=300\"]' (replaces the "
                          "preset's list) or --arg num_workers=1")
    run.add_argument("--model-name", default="mar3d", help="registered release name")
    run.add_argument("--gate-max-chamfer", type=float, default=None,
                     help="promotion gate: largest acceptable Chamfer distance (default: the preset's)")
    run.add_argument("--gate-min-fscore", type=float, default=None,
                     help="promotion gate: smallest acceptable F-score (default: the preset's)")
    run.add_argument("--gate-baseline", dest="gate_baseline",
                     action=argparse.BooleanOptionalAction, default=None,
                     help="promotion gate: the release must beat the constant mean-shape baseline "
                          "on every gate metric of the held-out objects, even as the registry's "
                          "first release (default: the preset's: on, except smoke, a plumbing check "
                          "of 4 objects and a few steps); --no-gate-baseline turns this floor off")
    run.add_argument("--result-json", type=Path, default=None, metavar="PATH", help=argparse.SUPPRESS)
    run.set_defaults(func=_cmd_pipeline_run)
    submit = pipe_sub.add_parser("submit", help="submit the compiled pipeline to Kubeflow Pipelines")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
    submit.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter (JSON values allowed); repeatable, "
                             "e.g. --arg dataset_uri=s3://bucket/meshes --arg workdir=/mnt/mar3d --arg use_gpu=true")
    submit.add_argument("--preset", default="paper", choices=pipeline_presets(),
                        help=f"{PRESET_HELP} (default: paper); --arg values win")
    submit.add_argument("--experiment", default="mar3d")
    submit.add_argument("--namespace", default=None)
    submit.add_argument("--package", type=Path, default=None, help="compiled IR YAML (default: compile now)")
    submit.add_argument("--result-json", type=Path, default=None, metavar="PATH", help=argparse.SUPPRESS)
    submit.set_defaults(func=_cmd_pipeline_submit)


def add_ray_commands(sub: argparse._SubParsersAction) -> None:
    """`mar3d ray submit`."""
    ray = sub.add_parser("ray", help="submit a single stage to a Ray cluster")
    ray_sub = ray.add_subparsers(dest="ray_command", required=True, metavar="SUBCOMMAND")
    rs = ray_sub.add_parser("submit", help="run one `mar3d ...` stage as a Ray job and wait",
                            description="Submit one stage to a Ray cluster's job server "
                                        "(JobSubmissionClient), stream its log, fail with its error.",
                            epilog="example: mar3d ray submit --address http://ray-head:8265 -- "
                                   "mar3d train vae --config train_vae_paper")
    rs.add_argument("--address", required=True, help="Ray dashboard/job address, http://HOST:8265")
    rs.add_argument("--result-json", type=Path, default=None, metavar="PATH", help=argparse.SUPPRESS)
    rs.add_argument("command_argv", nargs=argparse.REMAINDER, help="-- mar3d <stage> ...")
    rs.set_defaults(func=_cmd_ray_submit)


def main(argv: list[str] | None = None) -> int:
    return library_main(argv, extensions=(add_pipeline_commands, add_ray_commands))


if __name__ == "__main__":
    raise SystemExit(main())
