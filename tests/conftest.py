"""Shared fixtures: one local Ray instance, one 2-node Ray cluster and one real `mlflow
server` per test session, the shards several modules read, and the session's trained
release (one pipeline run on the cluster) that every test of trained models reads.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from _credentials import MLFLOW_ADMIN_PASSWORD, SESSION_CREDENTIALS
from _report import PROPERTY, collect, printable, summary
from _services import add_mlflow_user, start_mlflow_server, stop_mlflow_server
from _ycb import YCB, YCB_SMALL

# The tests of the session's cluster and trained release run on one xdist worker.
pytest_plugins = ["_xdist_groups"]

# Tests share 2 cores with Ray workers; oversubscribed BLAS/OpenMP threads made the
# model tests ~10x slower. Benchmarks, not tests, measure speed.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Every process the tests start inherits the session's MLflow account (tests/_credentials.py).
os.environ.update(SESSION_CREDENTIALS)


class ServerURI(str):
    """A server's URI that also knows the folder holding its stores (``root``)."""

    def __new__(cls, uri: str, root: Path):
        self = super().__new__(cls, uri)
        self.root = root
        return self

    def __reduce__(self):  # handed to Ray tasks and actors as the plain URI
        return str, (str(self),)


class ReliabilityReport:
    """Adds one test's rows to the reliability summary: ``add(section, column=value, ...)``.
    A row travels with the test's own report (``user_properties``, so ``--junitxml``
    records it with the test too); the tables are printed under "mar3d reliability
    summary" (tests/_report.py) and, when ``MAR3D_RELIABILITY_JSON`` names a file,
    written there as JSON."""

    def __init__(self, node: pytest.Item):
        self.node = node

    def add(self, section: str, **row) -> None:
        self.node.user_properties.append((PROPERTY, [section, printable(row)]))


@pytest.fixture
def reliability_report(request) -> ReliabilityReport:
    """What a fault, load or bad-input test tried and what came of it (tests/reliability/,
    and the fault on object storage in test_object_storage.py)."""
    return ReliabilityReport(request.node)


def pytest_runtest_logreport(report):
    collect(report)


def pytest_terminal_summary(terminalreporter):
    summary(terminalreporter)


@pytest.fixture(scope="session")
def ycb_root() -> Path:
    if not YCB.is_dir():
        pytest.skip(f"YCB dataset not found at {YCB} (set MAR3D_YCB)")
    return YCB


@pytest.fixture(scope="session")
def ycb_small_dir(tmp_path_factory, ycb_root) -> Path:
    """A directory with a few YCB objects (symlinked), as a small input dataset."""
    root = tmp_path_factory.mktemp("ycb_small")
    for name in YCB_SMALL:
        os.symlink(ycb_root / name, root / name)
    return root


@pytest.fixture(scope="session")
def ycb_small_shards(tmp_path_factory, ycb_small_dir, ray_local) -> Path:
    """The YCB_SMALL objects prepared once per session (tiny data config, 4 rows)."""
    from _shards import make_small_shards

    return make_small_shards(ycb_small_dir, tmp_path_factory.mktemp("small_shards") / "data")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (fractional CPUs let 2 train workers fit)."""
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=True, ignore_reinit_error=True,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real 2-node Ray cluster started the way users start one (`mar3d cluster up
    --local --nodes 2`: head with dashboard + Jobs API, one worker node joined with `ray
    start --address`), shared by the session and stopped with `mar3d cluster down`."""
    import json
    import subprocess
    import sys

    from mar3d.cluster import LocalCluster

    state = tmp_path_factory.mktemp("ray_cluster")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    up = subprocess.run([sys.executable, "-m", "mar3d", "cluster", "up", "--local", "--nodes", "2",
                         "--state-dir", str(state), "--result-json", str(state / "up.json")],
                        env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert json.loads((state / "up.json").read_text())["dashboard_url"].startswith("http://127.0.0.1:")
    yield LocalCluster.load(state)
    down = subprocess.run([sys.executable, "-m", "mar3d", "cluster", "down", "--state-dir", str(state)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]


@pytest.fixture
def cluster_env(ray_cluster, monkeypatch):
    """This test talks to ``ray_cluster``; returns the cluster."""
    _talk_to(ray_cluster, monkeypatch)
    return ray_cluster


def _talk_to(cluster, patch: pytest.MonkeyPatch) -> None:
    """This process and what it starts talk to ``cluster``: its auth token in the
    environment, no RAY_ADDRESS pointing elsewhere."""
    for key, value in cluster.client_env().items():
        patch.setenv(key, value)
    patch.delenv("RAY_ADDRESS", raising=False)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and local artifact store,
    with authentication: MLflow's basic-auth app, the session's pipeline account
    (``SESSION_CREDENTIALS``, in every test's environment) made by its admin."""
    root = tmp_path_factory.mktemp("mlflow")
    uri, proc = start_mlflow_server(root, admin_password=MLFLOW_ADMIN_PASSWORD)
    add_mlflow_user(uri, MLFLOW_ADMIN_PASSWORD, SESSION_CREDENTIALS["MLFLOW_TRACKING_USERNAME"],
                    SESSION_CREDENTIALS["MLFLOW_TRACKING_PASSWORD"])
    yield ServerURI(uri, root)
    stop_mlflow_server(proc)


@pytest.fixture(scope="session")
def cluster_pipeline(ray_cluster, ycb_small_dir, mlflow_server, tmp_path_factory):
    """The session's trained release: the pipeline run on ``ray_cluster`` through the Jobs
    API, its train-vae driver killed and the run resumed (tests/_pipeline_run.py). The
    training, cascade, feature-cache and serving tests read its runs and its release
    instead of training their own."""
    from _pipeline_run import run_cluster_pipeline

    with pytest.MonkeyPatch.context() as patch:
        _talk_to(ray_cluster, patch)
        return run_cluster_pipeline(ray_cluster, ycb_small_dir,
                                    tmp_path_factory.mktemp("cluster_pipeline") / "work", mlflow_server)
