"""The one way a pipeline component runs a `mar3d ...` step: here, or as a Ray job.

Every kfp component is a thin wrapper that builds the argv of a `mar3d` CLI command and
hands it to :func:`run_step`. The step itself (data preparation, training, evaluation,
promotion, generation) lives only in the `mar3d` library, so nothing is duplicated here.

* ``ray_address`` empty: the command runs in this process through ``mar3d.cli.main``
  (laptop / ``kfp.local`` runs; the step may still start a local Ray for training).
* ``ray_address`` set (``http://<head-svc>:8265``): the command is submitted to that
  long-lived RayCluster with ``JobSubmissionClient``; its log is streamed into the
  component's log as it is written (``tail_job_logs``), SIGINT/SIGTERM of the component
  stops the Ray job, and a failed/stopped job raises :class:`StepFailed` carrying Ray's
  error message and the last lines of the job's log.

The step's structured result travels back the same way in both modes: every `mar3d`
command accepts ``--result-json PATH`` and writes its result there. For a Ray job the
result file is on the Ray driver's disk, so the job's entrypoint is this module's
``__main__`` wrapper, which runs the command and prints the result on one marker line
that :func:`run_step` reads back from the job log. That way no storage has to be shared
between the kfp pod and the Ray pods just to pass a few strings (datasets, checkpoints
and MLflow artifacts are on shared storage anyway).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

RESULT_MARKER = "MAR3D_STEP_RESULT_JSON: "
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class StepFailed(RuntimeError):
    """A pipeline step whose `mar3d` command (local or Ray job) did not succeed."""


def step_dir(workdir: str, job_id: str, step: str) -> str:
    """Where a step of one pipeline run writes its outputs: ``<workdir>/<job id>/<step>``.

    Keyed by the pipeline job id so two runs sharing a workdir never overwrite each other.
    Plain string joining keeps ``s3://`` style roots intact."""
    if not workdir:
        raise ValueError("workdir must be a non-empty path or URI shared by all steps")
    if not job_id:
        raise ValueError("job_id must be non-empty (pass dsl.PIPELINE_JOB_ID_PLACEHOLDER)")
    return f"{workdir.rstrip('/')}/{job_id}/{step}"


def optional_flag(flag: str, value: str) -> list[str]:
    """``[flag, value]`` when value is set, ``[]`` for kfp's empty-string "not given"."""
    return [flag, value] if value else []


def override_flags(overrides: list) -> list[str]:
    """``--set key=value`` for each ``key=value`` config override."""
    out: list[str] = []
    for ov in overrides or []:
        if not isinstance(ov, str) or "=" not in ov:
            raise ValueError(f"config override {ov!r} must be a 'key.sub=value' string")
        out += ["--set", ov]
    return out


def train_argv(stage: str, data: str, storage_path: str, config: str, overrides: list,
               num_workers: int, use_gpu: bool, mlflow_tracking_uri: str,
               vae_model_uri: str = "", condition_model_uri: str = "",
               feature_cache: str = "") -> list[str]:
    """`mar3d train <stage>` for a pipeline run: the run's values go in as TrainConfig
    overrides after the user's, so the pipeline's data/outputs/scaling always win."""
    settings = [f"data={data}", f"storage_path={storage_path}", f"run_name={stage}",
                f"num_workers={int(num_workers)}", f"use_gpu={'true' if use_gpu else 'false'}"]
    if mlflow_tracking_uri:
        settings.append(f"mlflow_uri={mlflow_tracking_uri}")
    if vae_model_uri:
        settings.append(f"vae_model_uri={vae_model_uri}")
    if condition_model_uri:
        settings.append(f"condition_model_uri={condition_model_uri}")
    if feature_cache:
        settings.append(f"feature_cache={feature_cache}")
    return (["mar3d", "train", stage] + optional_flag("--config", config)
            + override_flags(overrides) + override_flags(settings))


def run_step(argv: list[str], ray_address: str | None, *,
             runtime_env: dict[str, Any] | None = None,
             poll_seconds: float = 2.0,
             timeout_seconds: float | None = None,
             log_dir: str = "") -> dict[str, Any]:
    """Run ``mar3d <args>`` (``argv[0] == "mar3d"``) and return the step's result mapping.

    ``log_dir``: the step's output folder. When the pipeline's launcher asks for step logs
    (``MAR3D_STEP_LOGS``), the step's full output goes to ``log_dir/step.log`` and only
    its start, progress and result reach this process's stdout (all of it with
    ``MAR3D_VERBOSE``)."""
    if not argv or argv[0] != "mar3d":
        raise ValueError(f"a step command must start with 'mar3d', got {argv!r}")
    if "--result-json" in argv:
        raise ValueError("run_step adds --result-json itself; do not pass it")
    try:
        return StepOutput(argv, step_log_path(log_dir)).run(ray_address, runtime_env, poll_seconds,
                                                             timeout_seconds)
    except StepFailed as exc:
        record_failure(argv, str(exc))
        raise


STEP_LOG = "step.log"


def step_log_path(log_dir: str) -> Path | None:
    """``log_dir/step.log`` when the launcher asked for step logs and the folder is local
    (a step on object storage keeps its output in its pod's or job's log)."""
    from mar3d import storage
    from mar3d.logs import STEP_LOGS_ENV

    if not log_dir or os.environ.get(STEP_LOGS_ENV) != "1" or storage.is_remote(log_dir):
        return None
    return Path(log_dir) / STEP_LOG


class StepOutput:
    """Where one step's output goes. Without a log file: all of it to stdout, as the
    command prints it. With one (``log_path``): all of it to that file, and to stdout
    either all of it too (``MAR3D_VERBOSE``) or only the step's events: a start line,
    its progress bar and an end line with its key result (:func:`summarize`), which the
    launcher draws (:class:`mar3d.logs.EventView`)."""

    def __init__(self, argv: list[str], log_path: Path | None):
        from mar3d.logs import is_verbose

        self.argv, self.step, self.log_path = argv, step_name(argv), log_path
        self.quiet = log_path is not None and not is_verbose()
        self.started = time.monotonic()

    def run(self, ray_address: str | None, runtime_env: dict[str, Any] | None,
            poll_seconds: float, timeout_seconds: float | None) -> dict[str, Any]:
        from mar3d.logs import console_stream

        if not ray_address and self.log_path is None:
            return _run_in_process(self.argv)
        # Captured here, the step's stdout is a pipe: this process's own goes on beside it.
        console = console_stream() if not ray_address else contextlib.nullcontext(sys.stdout)
        with console as stdout:
            router = self._begin(stdout)
            try:
                result = (_run_as_ray_job(self.argv, ray_address, self._runtime_env(runtime_env),
                                          poll_seconds, timeout_seconds, router)
                          if ray_address else self._run_captured(router))
            except StepFailed as exc:
                message = f"{exc}" + (f"\nfull log: {self.log_path}" if self.log_path else "")
                self._end(stdout, router, error=message)
                raise StepFailed(message) from None
            finally:
                router.close()  # a no-op after _end; on anything else, before stdout closes
            self._end(stdout, router, result=result)
            return result

    def _begin(self, stdout):
        from mar3d.logs import LineRouter, emit_event, open_log

        log = open_log(self.log_path) if self.log_path is not None else None
        if not self.quiet:
            return LineRouter(log, echo=stdout, keep_prefix=RESULT_MARKER)
        emit_event({"kind": "step", "state": "start", "step": self.step,
                    "log": str(self.log_path)}, stdout)
        return LineRouter(log, on_event=lambda event, line: emit_event(event, stdout),
                          keep_prefix=RESULT_MARKER)

    def _runtime_env(self, runtime_env: dict[str, Any] | None) -> dict[str, Any] | None:
        """The job's ``runtime_env`` plus this run's output settings for its processes."""
        from mar3d.logs import EVENTS_ENV, worker_env

        env = {**worker_env(), **({EVENTS_ENV: "1"} if self.quiet else {})}
        if not env:
            return runtime_env
        runtime_env = dict(runtime_env or {})
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
        return runtime_env

    def _run_captured(self, router) -> dict[str, Any]:
        """The step in this process, everything it writes going to ``router``."""
        from mar3d.logs import EVENTS_ENV, captured_output

        saved = os.environ.get(EVENTS_ENV)
        try:
            with captured_output(router.write):
                if self.quiet:
                    os.environ[EVENTS_ENV] = "1"
                try:
                    return _run_in_process(self.argv)
                except StepFailed:
                    raise
                except Exception as exc:  # noqa: BLE001 - its traceback goes to the step's log
                    traceback.print_exc()
                    raise StepFailed(f"`{shlex.join(self.argv)}` raised {type(exc).__name__}: "
                                     f"{exc}") from None
        except StepFailed as exc:
            # Raised once the capture is closed, so the tail holds the command's own error.
            raise StepFailed(f"{exc}{last_lines(router)}") from None
        finally:
            _restore_env(EVENTS_ENV, saved)

    def _end(self, stdout, router, result: dict[str, Any] | None = None,
             error: str | None = None) -> None:
        from mar3d.logs import emit_event

        router.close(f"\nmar3d step failed: {error}\n" if error else "")
        if not self.quiet:
            return
        event = {"kind": "step", "step": self.step, "log": str(self.log_path),
                 "seconds": round(time.monotonic() - self.started, 1)}
        if error is None:
            event.update(state="done", summary=summarize(self.argv, result or {}))
        else:
            event.update(state="failed")
        emit_event(event, stdout)


def last_lines(router) -> str:
    """The end of a failed step's output for its error message."""
    router.flush()
    return "\n--- last log lines ---\n" + "\n".join(router.tail) if router.tail else ""


def _restore_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def summarize(argv: list[str], result: dict[str, Any]) -> str:
    """A step's key result in a few words (its full result is in its log)."""
    from mar3d.logs import short_value

    step = step_name(argv)
    metrics = result.get("metrics") or {}
    if step == "data prepare":
        return (f"{result.get('num_rows')} objects in {len(result.get('shards_written') or [])} new "
                f"shard(s), {result.get('num_errors')} rejected, {result.get('skipped')} already done")
    if step.startswith("train"):
        return f"{metrics.get('step')} steps, final loss {short_value(metrics.get('train/loss'))}"
    if step == "evaluate":
        shown = [k for k in ("heldout_objects/f_score", "heldout_objects/chamfer",
                             "seen_view/f_score") if k in metrics]
        return ", ".join(f"{k} {short_value(metrics[k])}" for k in shown) or f"{len(metrics)} metrics"
    if step == "promote":
        verdict = "promoted" if result.get("promoted") else "refused"
        return f"{result.get('release_uri')} {verdict} (champion: {result.get('champion_uri')})"
    if step == "generate":
        return f"{result.get('succeeded')} meshes, {result.get('failed')} failed, in {result.get('output')}"
    return ""


FAILURES_ENV = "MAR3D_STEP_FAILURES"


def record_failure(argv: list[str], message: str) -> Path | None:
    """Leave a failed step's message where the pipeline's launcher can find it.

    kfp's local runner reports only "Inner task failed: <name>"; the launcher
    (:func:`pipelines.orchestrate.run_local`) points ``MAR3D_STEP_FAILURES`` at a folder and
    puts the newest message found there into its own error."""
    folder = os.environ.get(FAILURES_ENV)
    if not folder:
        return None
    path = Path(folder) / f"{time.time_ns()}-{step_name(argv).replace(' ', '-')}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"`mar3d {step_name(argv)}` failed: {message}")
    return path


def step_failed(argv: list[str], message: str) -> StepFailed:
    """A :class:`StepFailed` for a step whose command ran but whose result is refused
    (no rows, gate not passed), recorded like a failed command."""
    record_failure(argv, message)
    return StepFailed(message)


def _run_in_process(argv: list[str]) -> dict[str, Any]:
    from mar3d.cli import main

    with tempfile.TemporaryDirectory(prefix="mar3d-step-") as tmp:
        result_path = Path(tmp) / "result.json"
        print("running:", shlex.join(argv), flush=True)
        try:
            code = main(list(argv[1:]) + ["--result-json", str(result_path)])
        except SystemExit as exc:  # argparse errors exit instead of returning
            code = exc.code if isinstance(exc.code, int) else 1
        if code not in (0, None):
            detail = f"; its result: {result_path.read_text()}" if result_path.is_file() else ""
            raise StepFailed(f"`{shlex.join(argv)}` exited with status {code}{detail}")
        if not result_path.is_file():
            raise StepFailed(f"`{shlex.join(argv)}` succeeded but wrote no --result-json file")
        return json.loads(result_path.read_text())


def step_name(argv: list[str]) -> str:
    """``data prepare``, ``train vae``, ``evaluate``, ...: the command without its options."""
    words = [argv[1]] + ([argv[2]] if len(argv) > 2 and not argv[2].startswith("-") else [])
    return " ".join(words)


def ray_entrypoint(argv: list[str]) -> str:
    """The shell entrypoint of the Ray job that runs ``argv`` and prints its result."""
    return shlex.join(["python", "-m", "components._run", "--", *argv])


def parse_result_from_logs(logs: str) -> dict[str, Any]:
    """The result a Ray job printed on its marker line (the last one wins)."""
    return json.loads(_result_line(logs)[len(RESULT_MARKER):])


class _LogFollower:
    """Streams a Ray job's log, as the driver writes it (Ray's ``tail_job_logs``
    websocket, in a thread of its own), into the step's :class:`mar3d.logs.LineRouter`,
    which keeps what the step needs afterwards: the last lines for a failure message,
    and the result marker line."""

    def __init__(self, client, submission_id: str, router):
        self.client, self.submission_id, self.router = client, submission_id, router
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"logs-{submission_id}", daemon=True)

    def start(self) -> "_LogFollower":
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        self.router.flush()

    def _run(self) -> None:
        try:
            asyncio.run(self._follow())
        except Exception as exc:  # noqa: BLE001 - the status poll decides the outcome
            self.error = f"{type(exc).__name__}: {exc}"

    async def _follow(self) -> None:
        async for chunk in self.client.tail_job_logs(self.submission_id):
            self.router.write(chunk)


class _Terminated(BaseException):
    """SIGTERM, raised where the step is waiting (a pod being deleted, `kill`)."""


def _raise_on_sigterm(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def _run_as_ray_job(argv: list[str], address: str, runtime_env: dict[str, Any] | None,
                    poll_seconds: float, timeout_seconds: float | None, router) -> dict[str, Any]:
    from mar3d.cluster import job_client

    client = job_client(address)
    submission_id = f"mar3d-{argv[1]}-{uuid.uuid4().hex[:10]}"
    entrypoint = ray_entrypoint(argv)
    client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                      runtime_env=runtime_env or None,
                      metadata={"mar3d.step": step_name(argv)})
    router.write(f"submitted Ray job {submission_id} to {address}: {entrypoint}\n")
    follower = _LogFollower(client, submission_id, router).start()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if _in_main_thread() else None
    started = time.monotonic()
    try:
        while (status := str(client.get_job_status(submission_id).value)) not in TERMINAL:
            if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
                _stop(client, submission_id)
                raise StepFailed(f"Ray job {submission_id} ran past {timeout_seconds:.0f}s and was stopped")
            time.sleep(poll_seconds)
    except (KeyboardInterrupt, _Terminated) as exc:
        # The step is being cancelled: its Ray job must not outlive it.
        _stop(client, submission_id)
        why = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
        raise StepFailed(f"step interrupted ({why}); stopped its Ray job {submission_id}") from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    follower.join(timeout=30)
    if status != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        error_type = f" ({info.error_type})" if getattr(info, "error_type", None) else ""
        # Ray appends up to 20k characters of log to its message; the tail we kept is enough.
        reason = (info.message or "no message").split(", last available logs")[0].strip()
        raise StepFailed(f"Ray job {submission_id} {status}: {reason}{error_type}{last_lines(router)}")
    # Without the marker line the websocket dropped before the end: read the finished log once.
    result_line = router.kept or _result_line(client.get_job_logs(submission_id))
    return json.loads(result_line[len(RESULT_MARKER):])


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _stop(client, submission_id: str, wait_seconds: float = 30) -> None:
    """Stop the job and wait until Ray reports it terminal (its driver is then gone)."""
    try:
        client.stop_job(submission_id)
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if str(client.get_job_status(submission_id).value) in TERMINAL:
                return
            time.sleep(0.5)
    except Exception as exc:  # noqa: BLE001 - report, but keep the original failure
        print(f"warning: could not stop Ray job {submission_id}: {exc}", file=sys.stderr, flush=True)


def _result_line(logs: str) -> str:
    lines = [ln for ln in logs.splitlines() if ln.startswith(RESULT_MARKER)]
    if not lines:
        raise StepFailed("the Ray job succeeded but printed no result line "
                         f"({RESULT_MARKER.strip()} ...); see its log above")
    return lines[-1]


def write_pointer(artifact, result: dict[str, Any], location: str) -> None:
    """Record a step's result on a kfp output artifact.

    The data itself (shards, checkpoints, meshes) stays where the step wrote it on shared
    storage; the artifact is a small JSON pointer to it, so kfp only moves a few bytes and
    the lineage (artifact -> location, metrics) is visible in the kfp UI."""
    artifact.metadata["location"] = location
    for key, value in result.items():
        if isinstance(value, (str, int, float, bool)):
            artifact.metadata[key] = value
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({"location": location, **result}, indent=2))


def read_pointer(artifact) -> dict[str, Any]:
    """The result an upstream step recorded with :func:`write_pointer`."""
    path = Path(artifact.path)
    if not path.is_file():
        raise StepFailed(f"upstream artifact {artifact.uri} has no pointer file at {path}")
    return json.loads(path.read_text())


def _main(args: list[str]) -> int:
    """Ray job entrypoint: ``python -m components._run -- mar3d <args>``."""
    if args[:1] == ["--"]:
        args = args[1:]
    try:
        result = _run_in_process(args)
    except StepFailed as exc:
        # The command already printed its own error; one line, no traceback, for the log tail.
        print(f"mar3d step failed: {exc}", file=sys.stderr, flush=True)
        return 1
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(_main(sys.argv[1:]))
