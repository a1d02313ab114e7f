"""MetricLogger during a tracking outage: records wait on disk, nothing raises, the
server is not hammered, and the backlog is replayed in order once the server answers."""
from __future__ import annotations

import json
import math
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException

from mar3d.tracking import MetricLogger, backlog_size, is_outage, replay_backlog


def test_is_outage_separates_unreachable_from_refused():
    assert is_outage(ConnectionError("refused"))
    assert is_outage(MlflowException("API request to http://x failed with exception ..."))
    assert is_outage(RestException({"error_code": "INTERNAL_ERROR", "message": "boom"}))
    assert not is_outage(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no run"}))
    assert not is_outage(ValueError("a bug"))


def test_outage_spills_to_backlog_then_replays(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("test-backlog") or client.get_experiment(
        client.create_experiment("test-backlog"))
    run_id = client.create_run(exp.experiment_id).info.run_id
    backlog = tmp_path / "backlog.jsonl"

    # A logger pointed at a port nobody listens on: an outage from the first flush.
    down = MetricLogger("http://127.0.0.1:9", run_id, backlog, retry_interval_s=60)
    down.log({"loss": 1.0}, step=1)
    down.flush()
    assert down.outage and backlog_size(backlog) == 1
    t0 = time.monotonic()
    for step in range(2, 6):  # inside the retry interval: no request at all, just the file
        down.log({"loss": 1.0 / step, "bad": math.nan}, step=step)
        down.flush()
    assert time.monotonic() - t0 < 1.0
    records = [json.loads(line) for line in backlog.read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "metric" and r["key"] == "loss"] == [1, 2, 3, 4, 5]
    assert any(r["type"] == "tag" and r["key"] == "nonfinite.bad" for r in records)

    # The server answers: the next flush of a logger that can reach it replays in order.
    up = MetricLogger(mlflow_server, run_id, backlog)
    up.log({"loss": 0.1}, step=6)
    up.flush()
    assert not backlog.exists()
    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).data.tags["nonfinite.bad"] == "step 5"
    assert replay_backlog(client, run_id, backlog) == 0


def test_refused_request_is_an_error_not_an_outage(mlflow_server, tmp_path):
    logger = MetricLogger(mlflow_server, "0" * 32, tmp_path / "backlog.jsonl")  # no such run
    logger.log({"loss": 1.0}, step=1)
    with pytest.raises(MlflowException):
        logger.flush()
    assert not (tmp_path / "backlog.jsonl").exists()
