"""The one run lifecycle every job uses (mar3d.tracking.tracked_run), on a real local
MLflow store (SQLite): FINISHED after the block, FAILED when it raises, left RUNNING for
a resume when the tracking server went away (training), re-opened by run id."""
from __future__ import annotations

import pytest

from mar3d import tracking


@pytest.fixture()
def store(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _status(uri: str, run_id: str) -> str:
    return tracking.client(uri).get_run(run_id).info.status


def test_a_block_that_completes_finishes_its_run(store):
    with tracking.tracked_run(store, "lifecycle", "ok", tags={"mar3d.kind": "test"}) as run:
        assert _status(store, run.run_id) == "RUNNING"
        tracking.log_metrics(store, run.run_id, {"x": 1.0})
    run_info = tracking.client(store).get_run(run.run_id)
    assert run_info.info.status == "FINISHED"
    assert run_info.data.tags["mar3d.kind"] == "test" and run_info.data.metrics["x"] == 1.0


def test_a_block_that_raises_fails_its_run_and_the_error_is_kept(store):
    with pytest.raises(ValueError, match="the job's own error"):
        with tracking.tracked_run(store, "lifecycle", "boom") as run:
            raise ValueError("the job's own error")
    assert _status(store, run.run_id) == "FAILED"


def test_a_tracking_error_fails_a_run_that_is_not_resumed(store):
    with pytest.raises(tracking.TrackingError):
        with tracking.tracked_run(store, "lifecycle", "once") as run:
            raise tracking.TrackingError("server refused a record")
    assert _status(store, run.run_id) == "FAILED"


def test_a_tracking_outage_leaves_a_resumable_run_running_for_its_resume(store):
    with pytest.raises(tracking.TrackingError):
        with tracking.tracked_run(store, "lifecycle", "outage", resumable=True) as run:
            raise tracking.TrackingError("server went away; everything is on disk")
    assert _status(store, run.run_id) == "RUNNING"
    with tracking.tracked_run(store, "lifecycle", "outage", run_id=run.run_id) as again:
        assert again.run_id == run.run_id
    assert _status(store, run.run_id) == "FINISHED"


def test_finish_inside_the_block_is_not_repeated(store):
    with tracking.tracked_run(store, "lifecycle", "early") as run:
        run.finish()
        assert _status(store, run.run_id) == "FINISHED"
        end_time = tracking.client(store).get_run(run.run_id).info.end_time
    assert tracking.client(store).get_run(run.run_id).info.end_time == end_time
