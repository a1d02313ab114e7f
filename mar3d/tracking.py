"""MLflow helpers shared by the training driver and its rank-0 worker.

The driver owns the run: it checks the tracking server is reachable, creates (or, on a
resumed training, re-opens) the run and hands the ``run_id`` to the workers. Worker
rank 0 then logs into that run through a plain :class:`mlflow.MlflowClient` (no global
"active run" state inside Ray actors). Only one process logs at a time: while the
workers train, the driver waits in ``fit()``.

Tracking URIs: ``http(s)://host:port`` (an ``mlflow server``, what clusters use), or a
local ``sqlite:///path/mlflow.db`` (what a laptop run uses by default: see
:func:`default_tracking_uri`). A server that does not answer when a job starts is
reported within ``timeout_s`` seconds instead of hanging in MLflow's retry loop; one that
stops answering *during* training does not stop it: :class:`MetricLogger` keeps the
records in an on-disk backlog and replays them when the server is back.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator

from mar3d import storage
from mar3d.uris import refuse_credentials

log = logging.getLogger(__name__)

# MLflow retries HTTP calls for minutes by default; a dead tracking server should fail a
# training job quickly and clearly instead. Set before any MLflow request is made.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
             "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingError(RuntimeError):
    """The MLflow tracking server cannot be used (unreachable, bad URI, missing run)."""


def configure_http_timeouts() -> None:
    for key, value in _HTTP_ENV.items():
        os.environ.setdefault(key, value)


def default_tracking_uri(storage_path: str | Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else a SQLite store next to the training outputs."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    # SQLite needs a local file: outputs on object storage keep theirs in the local cache.
    base = storage.local_cache(storage_path) if storage.is_remote(storage_path) else \
        Path(storage_path).expanduser().resolve()
    path = base / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


CREDENTIALS_HINT = ("give them as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or "
                    "MLFLOW_TRACKING_TOKEN) in the environment instead")


def _no_credentials(tracking_uri: str) -> str:
    return refuse_credentials(tracking_uri, "MLflow tracking URI", CREDENTIALS_HINT, TrackingError)


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`TrackingError` unless ``tracking_uri`` answers (HTTP) or is local;
    a server with authentication must also accept this process's credentials."""
    if not tracking_uri:
        raise TrackingError("MLflow tracking URI is empty")
    _no_credentials(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=min(5.0, timeout_s)) as r:
                    if r.status == 200:
                        break
                    last = TrackingError(f"HTTP {r.status}")
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(0.5)
        else:
            raise TrackingError(f"MLflow tracking server {tracking_uri} is not reachable "
                                f"within {timeout_s:.0f}s ({last}); start it or set mlflow_uri")
        _check_credentials(tracking_uri)
        return
    if tracking_uri.startswith("sqlite:///"):
        parent = Path(tracking_uri[len("sqlite:///"):]).parent
        if not parent.is_dir():
            raise TrackingError(f"SQLite tracking store folder {parent} does not exist")
        return
    if tracking_uri.startswith(("file:", "/", "databricks", "postgresql", "mysql")):
        return
    raise TrackingError(f"unsupported MLflow tracking URI {tracking_uri!r} "
                        "(use http(s)://host:port or sqlite:///path/mlflow.db)")


def _check_credentials(tracking_uri: str) -> None:
    """A server with authentication (MLflow's basic-auth app) answers 401 to a request
    without valid credentials: say so before any job starts, naming the variables."""
    from mlflow.exceptions import MlflowException

    try:
        client(tracking_uri).search_experiments(max_results=1)
    except MlflowException as e:
        if "401" in str(e) or getattr(e, "error_code", "") == "UNAUTHENTICATED" or "Unauthorized" in str(e):
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TrackingError(
                f"MLflow tracking server {tracking_uri} refused "
                f"{'the credentials of user ' + repr(who) if who else 'a request without credentials'} "
                "(401): set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account "
                "of the server") from None
        raise


def client(tracking_uri: str | None = None):
    """The one way this package talks to MLflow: an explicit client for ``tracking_uri``
    (None: MLflow's default, ``MLFLOW_TRACKING_URI``), whose model registry is the same
    server (never MLflow's process-wide registry URI)."""
    configure_http_timeouts()
    # An s3:// artifact store is written by this client (boto3) with the AWS endpoint.
    storage.configure_mlflow_s3()
    import mlflow
    from mlflow import MlflowClient

    uri = _no_credentials(tracking_uri or mlflow.get_tracking_uri())
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_or_resume_run(tracking_uri: str, experiment: str, run_name: str,
                        run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Return the id of a RUNNING run: ``run_id`` re-opened if given, else a new run."""
    check_reachable(tracking_uri)
    c = client(tracking_uri)
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = c.get_run(run_id)
        except MlflowException as e:
            raise TrackingError(f"MLflow run {run_id} to resume is not in {tracking_uri}: {e.message}") from e
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow run {run_id} to resume has been deleted")
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(ensure_experiment(tracking_uri, experiment), run_name=run_name, tags=tags or {})
    return run.info.run_id


def ensure_experiment(tracking_uri: str | None, name: str) -> str:
    """The id of experiment ``name``, created if missing.

    A server decides where artifacts go (its default artifact root). A SQLite store has
    no such setting, and MLflow would put them in ``./mlruns`` of whatever folder the
    command was started from; so a new experiment of a SQLite store keeps its artifacts
    beside the database (:func:`local_artifact_location`), and a work folder holding
    ``mlflow.db`` holds everything that database points to."""
    import mlflow

    tracking_uri = tracking_uri or mlflow.get_tracking_uri()
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=local_artifact_location(tracking_uri, name))


def local_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """``file://<folder of mlflow.db>/mlartifacts/<experiment>`` for a SQLite tracking
    URI; None (the store's default) for anything else."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):]).expanduser().resolve()
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (db.parent / "mlartifacts" / folder).as_uri()


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    client(tracking_uri).set_terminated(run_id, status=status)


class TrackedRun:
    """A RUNNING MLflow run owned by a :func:`tracked_run` block."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.ended = False

    def finish(self) -> None:
        """Mark the run FINISHED now (inside the block, where the caller handles a failure
        to reach the server); the block's end then leaves it as it is."""
        end_run(self.tracking_uri, self.run_id, status="FINISHED")
        self.ended = True


@contextlib.contextmanager
def tracked_run(tracking_uri: str, experiment: str, run_name: str, run_id: str | None = None,
                tags: dict[str, str] | None = None, resumable: bool = False) -> Iterator[TrackedRun]:
    """The lifecycle of every run a mar3d job writes (training, evaluation, batch
    generation, releases and promotions): a RUNNING run, new or ``run_id`` re-opened
    (:func:`start_or_resume_run`), FINISHED when the block completes and FAILED when it
    raises. ``resumable`` (training, whose re-run re-opens its run): a
    :class:`TrackingError` (the server went away; the job's own error says where
    everything is) leaves the run RUNNING for that re-run. Failing to mark a run FAILED
    is logged, never raised over the job's own error."""
    run = TrackedRun(tracking_uri, start_or_resume_run(tracking_uri, experiment, run_name, run_id, tags))
    try:
        yield run
    except BaseException as e:
        if not (resumable and isinstance(e, TrackingError)):
            _mark_failed(run)
        raise
    if not run.ended:
        run.finish()


def _mark_failed(run: TrackedRun) -> None:
    try:
        end_run(run.tracking_uri, run.run_id, status="FAILED")
    except Exception as e:  # noqa: BLE001 - the job's own error is raised next
        log.error("could not mark MLflow run %s FAILED: %s", run.run_id, str(e).splitlines()[0][:200])


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_params(tracking_uri: str, run_id: str, params: dict[str, Any]) -> None:
    """Log params, skipping keys the run already has with the same value (resumed runs)."""
    from mlflow.entities import Param

    c = client(tracking_uri)
    existing = c.get_run(run_id).data.params
    new = [Param(k, _param_value(v)) for k, v in sorted(params.items())
           if existing.get(k) != _param_value(v)]
    changed = [p.key for p in new if p.key in existing]
    if changed:
        # MLflow params are immutable; a resumed run with a different config is a
        # different experiment and must not silently overwrite the record.
        raise TrackingError(f"run {run_id} already has different values for params {changed}; "
                            "use a new run_name to train with a different config")
    for i in range(0, len(new), 100):  # MLflow's log_batch limit
        c.log_batch(run_id, params=new[i:i + 100])


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0,
                tags: dict[str, Any] | None = None) -> None:
    """Log metrics (and tags) now; an unreachable server raises (short jobs: evaluation)."""
    now = int(time.time() * 1000)
    records = [{"type": "metric", "key": k, "value": float(v), "timestamp": now, "step": int(step)}
               for k, v in metrics.items()]
    records += [{"type": "tag", "key": k, "value": str(v)} for k, v in (tags or {}).items()]
    _send(client(tracking_uri), run_id, records)


def is_outage(error: BaseException) -> bool:
    """True when ``error`` means the tracking server could not be reached or failed
    (connection refused, timeout, HTTP 5xx), as opposed to a request it refused (4xx)."""
    from mlflow.exceptions import MlflowException

    # MLflow maps every answer to an error code, also a server's plain-text 401/403 (its
    # auth app) and a failed connection (INTERNAL_ERROR, 500).
    if isinstance(error, MlflowException):
        return error.get_http_status_code() >= 500
    return isinstance(error, OSError)  # ConnectionError, TimeoutError


class MetricLogger:
    """Metric and tag logging into one run (rank 0 of the training workers) that survives
    tracking-server outages without losing a record or stopping training.

    Records are sent in batches. When a send fails because the server is unreachable
    (:func:`is_outage`), the records are appended to ``backlog`` (JSON lines, in the run
    folder next to the checkpoints), a warning is logged once per outage, and training
    goes on; the server is tried again at most every ``retry_interval_s`` seconds, so a
    dead server costs one timed-out request per interval, not one per step. Once it
    answers, the backlog is replayed in order and removed. Whatever is still waiting when
    training ends is replayed by the driver (:func:`replay_backlog`), or by the next run of
    the same command if the server is still down then. A request the server *refuses*
    (4xx: a bad key, a deleted run) is a bug, not an outage, and raises.
    """

    def __init__(self, tracking_uri: str, run_id: str, backlog: str | Path, flush_every: int = 50,
                 retry_interval_s: float = 30.0):
        self.client = client(tracking_uri)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.backlog = Path(backlog)
        self.flush_every = flush_every
        self.retry_interval_s = retry_interval_s
        self._buffer: list[dict] = []
        self._down_since: float | None = None
        self._next_try = 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            value = float(value)
            self._buffer.append({"type": "metric", "key": key, "value": value, "timestamp": now,
                                 "step": int(step)})
            if not math.isfinite(value):
                # MLflow stores NaN but its plots hide it; make it visible as a tag too.
                self._buffer.append({"type": "tag", "key": f"nonfinite.{key}", "value": f"step {step}"})
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._buffer.extend({"type": "tag", "key": k, "value": str(v)} for k, v in tags.items())

    @property
    def outage(self) -> bool:
        return self._down_since is not None

    def flush(self) -> None:
        if not self._buffer and not self.backlog.is_file():
            return
        if self.outage and time.monotonic() < self._next_try:
            self._spill()
            return
        try:
            replay_backlog(self.client, self.run_id, self.backlog)
            _send(self.client, self.run_id, self._buffer)
            self._buffer = []
        except Exception as e:  # noqa: BLE001 - classified right below
            if not is_outage(e):
                raise
            self._spill()
            if not self.outage:
                self._down_since = time.monotonic()
                log.warning("MLflow server %s unreachable (%s); training goes on and metrics wait in %s "
                            "until it answers", self.tracking_uri, str(e).splitlines()[0][:300], self.backlog)
            self._next_try = time.monotonic() + self.retry_interval_s
            return
        if self.outage:
            log.warning("MLflow server %s answers again after %.0f s; backlog replayed",
                        self.tracking_uri, time.monotonic() - self._down_since)
            self._down_since = None

    def _spill(self) -> None:
        if not self._buffer:
            return
        self.backlog.parent.mkdir(parents=True, exist_ok=True)
        with open(self.backlog, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in self._buffer)
            f.flush()
            os.fsync(f.fileno())
        self._buffer = []


def _send(c, run_id: str, records: list[dict]) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in records if r["type"] == "metric"]
    for i in range(0, len(metrics), 1000):  # MLflow's log_batch limit
        c.log_batch(run_id, metrics=metrics[i:i + 1000])
    for r in records:
        if r["type"] == "tag":
            c.set_tag(run_id, r["key"], r["value"])


def replay_backlog(c, run_id: str, backlog: str | Path) -> int:
    """Send the records waiting in ``backlog`` (see :class:`MetricLogger`) in order and
    remove it; returns how many were sent. After each sent chunk the file is rewritten
    with the rest, so an interrupted replay sends again at most the chunk in flight."""
    backlog = Path(backlog)
    if not backlog.is_file():
        return 0
    records = [json.loads(line) for line in backlog.read_text().splitlines() if line.strip()]
    sent = 0
    while sent < len(records):
        chunk = records[sent:sent + 1000]
        _send(c, run_id, chunk)
        sent += len(chunk)
        rest = records[sent:]
        storage.write_bytes(backlog, "".join(json.dumps(r) + "\n" for r in rest).encode())
    backlog.unlink()
    return sent


def backlog_size(backlog: str | Path) -> int:
    backlog = Path(backlog)
    return sum(1 for line in backlog.read_text().splitlines() if line.strip()) if backlog.is_file() else 0


def log_artifacts(tracking_uri: str, run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    client(tracking_uri).log_artifacts(run_id, str(local_dir), artifact_path)


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(tracking_uri).get_metric_history(run_id, key)]


def list_artifacts(tracking_uri: str, run_id: str, path: str | None = None) -> Iterable[str]:
    return [f.path for f in client(tracking_uri).list_artifacts(run_id, path)]


USER_PASSWORD_ENV = "MAR3D_USER_PASSWORD"


def ensure_user(tracking_uri: str, username: str, password: str) -> bool:
    """Make ``username`` an account of an MLflow server that runs the basic-auth app,
    acting as its admin (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``):
    created if missing (True), else its password set to ``password`` (False). What a new
    account may do is the server's ``default_permission`` plus MANAGE on what it creates."""
    _no_credentials(tracking_uri)
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    if not username or not password:
        raise TrackingError("an MLflow account needs a user name and a non-empty password")
    auth = AuthServiceClient(tracking_uri)
    try:
        auth.get_user(username)
    except MlflowException as e:
        if getattr(e, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"MLflow at {tracking_uri} did not answer who {username!r} is: {e}") from None
        auth.create_user(username, password)
        return True
    auth.update_user_password(username, password)
    return False
