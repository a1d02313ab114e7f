"""Helpers to inject faults from outside and to read what the faulted job left behind:
find this session's processes by their Ray title, wait for observed progress, run a job
in a background thread; the steps a run logged to MLflow, the checkpoint Ray Train has
registered; the data job's shards and uids."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import psutil


def processes(fragment: str) -> list[psutil.Process]:
    """Live processes of this test session (the local Ray instance and its workers descend
    from the pytest process) whose command line (Ray sets it to ``ray::<task or actor>``)
    contains ``fragment``. Never another job's on the same machine: a second Ray instance
    running there has workers with the same titles."""
    found = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if fragment in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def processes_on(cluster, node: str, fragment: str) -> list:
    """The processes of a local cluster's ``node`` (:class:`mar3d.cluster.LocalCluster`)
    whose command line contains ``fragment``."""
    found = []
    for proc in cluster.node_processes(node):
        try:
            if fragment in " ".join(proc.cmdline()):
                found.append(proc)
        except Exception:  # noqa: BLE001 - ended while we looked
            continue
    return found


def wait_for(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Background:
    """Run ``fn`` in a thread; ``join()`` returns its result or re-raises its error."""

    def __init__(self, fn):
        self.result, self.error = None, None

        def target():
            try:
                self.result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                self.error = e

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def running(self) -> bool:
        """Whether ``fn`` still runs; once it has failed, raises its error, so that a wait
        for the job's progress fails at once with the cause rather than at its timeout."""
        if self.error is not None:
            raise self.error
        return self.thread.is_alive()

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout:.0f} s"
        return self.result


# ------------------------------------------------------------------ training runs
def logged_steps(client, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def latest_run_id(client, experiment: str, run_name: str) -> str | None:
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{run_name}'")
    return runs[0].info.run_id if runs else None


def registered_step(run: str | os.PathLike) -> int:
    """The step of the latest checkpoint Ray Train's controller has registered for the run
    folder ``run`` (local or ``s3://``); 0: none yet. A checkpoint folder written but not
    yet registered is not a restore point."""
    from mar3d import storage

    try:
        snapshot = storage.read_bytes(storage.join(run, "checkpoint_manager_snapshot.json"))
        latest = json.loads(snapshot).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        return 0
    return int((latest.get("metrics") or {}).get("step", 0))


# ----------------------------------------------------------------------- data jobs
def one_row_shards():
    """The test data config with one row per shard: a data job of the four YCB_SMALL
    objects writes four shards, so a fault can land between two of them."""
    from _shards import small_data_config

    cfg = small_data_config()
    cfg.shard_size = 1
    cfg.validate()
    return cfg


def uids(out: Path) -> list[str]:
    """The uids of every row in the complete shards of ``out``."""
    import pyarrow.parquet as pq

    from mar3d.data.prepare import complete_shards

    return sorted(u for s in complete_shards(out)
                  for u in pq.read_table(out / s["file"], columns=["uid"]).column("uid").to_pylist())
