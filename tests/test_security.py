"""Nobody gets in without credentials, and no credential leaks.

Against the real engines: the session's `mlflow server` runs MLflow's basic-auth app
(tests/_credentials.py: the pipeline's account is in every test's environment), and the
session's 2-node `mar3d cluster up` cluster runs Ray's token authentication. A client
without credentials, or with wrong ones, is refused; a read-only account cannot move the
registry's alias; URIs that carry credentials are refused without echoing them. Whether a
pipeline run writes a secret anywhere is checked by the pipeline tests themselves
(tests/_leaks.py), on their real outputs.
"""
from __future__ import annotations

import json
import os
import secrets
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from _services import add_mlflow_user
from _credentials import MLFLOW_ADMIN_PASSWORD, SESSION_CREDENTIALS
from mar3d import storage, tracking
from mar3d.uris import redact_credentials, refuse_credentials


def _status(url: str, headers: dict | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _basic(user: str, password: str) -> dict:
    import base64

    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --------------------------------------------------------------- URIs with credentials
@pytest.mark.parametrize("uri,shown", [
    ("http://alice:s3cr3t-pw@mlflow:5000", "http://***@mlflow:5000"),
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix", "s3://***@bucket/prefix"),
    ("https://token@host/path?x=1", "https://***@host/path?x=1"),
    ("http://mlflow:5000/a@b", "http://mlflow:5000/a@b"),  # '@' in the path: no credentials
    ("/local/path", "/local/path")])
def test_credentials_in_uris_are_redacted(uri, shown):
    assert redact_credentials(uri) == shown


def test_uris_with_credentials_are_refused_without_echoing_them():
    secret = "pw-" + secrets.token_hex(8)
    for call in (lambda: tracking.client(f"http://admin:{secret}@127.0.0.1:5000"),
                 lambda: tracking.check_reachable(f"https://admin:{secret}@mlflow.example"),
                 lambda: storage.check(f"s3://AKIAX:{secret}@bucket/data", "dataset"),
                 lambda: refuse_credentials(f"http://{secret}@h", "URI", "use the environment")):
        with pytest.raises((ValueError, tracking.TrackingError)) as err:
            call()
        assert secret not in str(err.value) and "***@" in str(err.value)
        assert "embeds credentials" in str(err.value)


def test_the_cli_refuses_a_tracking_uri_with_credentials(capsys, monkeypatch):
    from mar3d.cli import main

    secret = "pw-" + secrets.token_hex(8)
    monkeypatch.setenv("MAR3D_USER_PASSWORD", "x" * 16)
    code = main(["tracking", "add-user", "bob", "--tracking-uri", f"http://admin:{secret}@127.0.0.1:1"])
    out = capsys.readouterr()
    assert code == 1 and secret not in out.out + out.err
    assert "MLFLOW_TRACKING_USERNAME" in out.err and "***@127.0.0.1:1" in out.err


# ----------------------------------------------------------------- MLflow refusals
@pytest.mark.e2e
def test_mlflow_refuses_requests_without_valid_credentials(mlflow_server, monkeypatch):
    search = f"{mlflow_server}/api/2.0/mlflow/experiments/search"
    body = json.dumps({"max_results": 1}).encode()
    assert _status(search, data=body) == 401                                   # no credentials
    assert _status(search, _basic("mar3d-pipeline", "wrong-password"), body) == 401
    assert _status(search, _basic(SESSION_CREDENTIALS["MLFLOW_TRACKING_USERNAME"],
                                  SESSION_CREDENTIALS["MLFLOW_TRACKING_PASSWORD"]), body) == 200
    assert _status(f"{mlflow_server}/health") == 200                          # probes need none
    # The library says what is wrong before any job starts, without the password.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-123")
    with pytest.raises(tracking.TrackingError, match="401") as err:
        tracking.check_reachable(mlflow_server)
    assert "MLFLOW_TRACKING_PASSWORD" in str(err.value) and "wrong-password-123" not in str(err.value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with pytest.raises(tracking.TrackingError, match="without credentials"):
        tracking.check_reachable(mlflow_server)


@pytest.mark.e2e
def test_only_the_pipeline_account_moves_the_registry_alias(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    pipeline = MlflowClient(tracking_uri=mlflow_server)
    name = f"mar3d-auth-{uuid.uuid4().hex[:8]}"
    exp = pipeline.create_experiment(f"auth-{uuid.uuid4().hex[:8]}")
    run = pipeline.create_run(exp).info.run_id
    (tmp_path / "config.yaml").write_text("kind: test\n")
    pipeline.log_artifact(run, str(tmp_path / "config.yaml"), "model")
    pipeline.create_registered_model(name)
    version = pipeline.create_model_version(name, f"runs:/{run}/model", run_id=run).version
    pipeline.set_registered_model_alias(name, "champion", version)

    reader_password = f"reader-{secrets.token_hex(8)}"
    add_mlflow_user(mlflow_server, MLFLOW_ADMIN_PASSWORD, "reader", reader_password)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader_password)
    reader = MlflowClient(tracking_uri=mlflow_server)
    assert reader.get_model_version_by_alias(name, "champion").version == version   # may read
    with pytest.raises(MlflowException) as err:
        reader.set_registered_model_alias(name, "champion", version)
    assert "403" in str(err.value) or err.value.error_code == "PERMISSION_DENIED"
    with pytest.raises(MlflowException):
        reader.delete_registered_model_alias(name, "champion")
    assert pipeline.get_model_version_by_alias(name, "champion").version == version


# ------------------------------------------------------------------- Ray refusals
@pytest.mark.e2e
def test_ray_cluster_refuses_jobs_without_its_token(cluster_env, monkeypatch, tmp_path):
    """The Jobs API of a `mar3d cluster up` cluster: no token or a wrong one is refused
    (nothing runs); the right one is accepted."""
    from mar3d.cluster import job_client

    marker = tmp_path / "ran"
    submission = f"mar3d-unauth-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"entrypoint": f"touch {marker}", "submission_id": submission}).encode()
    jobs = f"{cluster_env.dashboard_url}/api/jobs/"
    assert _status(jobs, data=body) == 401
    assert _status(jobs, {"Authorization": "Bearer " + secrets.token_hex(32)}, body) in (401, 403)
    assert _status(f"{cluster_env.dashboard_url}/api/jobs/") == 401            # nor may it list
    token = Path(cluster_env.token_path).read_text().strip()
    assert _status(jobs, {"Authorization": f"Bearer {token}"}) == 200
    listed = {j.submission_id for j in job_client(cluster_env.dashboard_url).list_jobs()}
    assert submission not in listed and not marker.exists()
    # The submitting library names the cause when the token is missing.
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(Exception) as err:
        job_client(cluster_env.dashboard_url).list_jobs()
    assert "401" in str(err.value) or "uthenticat" in str(err.value) or "token" in str(err.value).lower()
    assert os.environ.get("RAY_AUTH_TOKEN") is None
