"""A release is an MLflow model: `mlflow models predict` and `mlflow models serve` run it.

The session's trained tiny cascade, registered and promoted by the session's pipeline run
(tests/_pipeline_run.py; registering a release writes its pyfunc model,
:mod:`mar3d.serving`) in the session's real `mlflow server` with basic auth. Then, as a
platform team would, with MLflow's own CLI and the local environment
(``--env-manager local``):

* ``mlflow models predict -m models:/NAME@champion`` on a JSON file of two rows (a base64
  image with settings, and an image path) writes GLBs that trimesh loads;
* ``mlflow models serve`` on 127.0.0.1 answers POSTs to ``/invocations``: a GLB for a
  good image (and one written under ``output_uri`` when given), 400 with the reason for a
  bad image or a bad setting, and still a GLB after them (the server survived).

The registry's pyfunc is loaded only by MLflow's subprocesses; shipped code never calls
``mlflow.pyfunc.load_model`` (tests/reliability/test_safety.py).
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from _services import _free_port, stop_mlflow_server, wait_until_answers

pytestmark = pytest.mark.e2e

RESOLUTION = 32  # a coarse grid: the test checks the serving path, not the shape


def _mlflow() -> str:
    return shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))


def _env(tracking_uri) -> dict[str, str]:
    """The environment of a user who activated the project's environment: MLflow starts
    the scoring server as ``uvicorn`` from PATH."""
    return {**os.environ, "MLFLOW_TRACKING_URI": str(tracking_uri),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _png_of_view(shards: Path) -> bytes:
    """A rendered view of a training object, as PNG bytes."""
    from PIL import Image

    from mar3d.data.dataset import ShapeDataset

    rgba = ShapeDataset(shards, num_occ=1024, with_occupancy=False, view_index=0, seed=0).sample(0)["image"]
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG")
    return buf.getvalue()


def _glb_mesh(row: dict, output: Path | None = None):
    import trimesh

    assert row["status"] == "ok", row
    data = Path(row["uri"]).read_bytes() if output else base64.b64decode(row["glb_base64"])
    mesh = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh")
    assert len(mesh.faces) == row["num_faces"] > 0
    return mesh


@pytest.fixture(scope="module")
def champion(cluster_pipeline):
    """The release the session's pipeline run promoted (tests/_pipeline_run.py)."""
    return cluster_pipeline.release_uri


@pytest.fixture(scope="module")
def shards(cluster_pipeline):
    return cluster_pipeline.data


def test_mlflow_models_predict_runs_the_champion(champion, mlflow_server, shards, tmp_path):
    png = _png_of_view(shards)
    (tmp_path / "view.png").write_bytes(png)
    rows = [{"image": base64.b64encode(png).decode(), "seed": 3, "resolution": RESOLUTION,
             "num_inference_steps": 8, "guidance_scale": 2.0},
            {"image": str(tmp_path / "view.png"), "resolution": RESOLUTION}]
    (tmp_path / "input.json").write_text(json.dumps({"dataframe_records": rows}))
    done = subprocess.run([_mlflow(), "models", "predict", "-m", champion, "--env-manager", "local",
                           "-i", str(tmp_path / "input.json"), "-t", "json", "-o", str(tmp_path / "out.json")],
                          env=_env(mlflow_server),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    predictions = json.loads((tmp_path / "out.json").read_text())["predictions"]
    assert len(predictions) == 2
    for row in predictions:
        _glb_mesh(row)
        assert row["level"] == "hr" and row["seconds"] > 0


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_mlflow_models_serve_answers_glbs_and_refuses_bad_input_with_400(
        champion, mlflow_server, shards, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([_mlflow(), "models", "serve", "-m", champion, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
                            env=_env(mlflow_server),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(base + "/ping", proc, tmp_path / "serve.log", 180, "mlflow models serve")
        image = base64.b64encode(_png_of_view(shards)).decode()
        good = {"dataframe_records": [{"image": image, "resolution": RESOLUTION, "seed": 1}]}

        status, body = _post(base + "/invocations", good)
        assert status == 200, body
        first = _glb_mesh(body["predictions"][0])

        out = tmp_path / "meshes"
        status, body = _post(base + "/invocations", {**good, "params": {"output_uri": str(out)}})
        assert status == 200, body
        row = body["predictions"][0]
        assert row["glb_base64"] == "" and Path(row["uri"]).parent == out
        assert len(_glb_mesh(row, output=out).faces) == len(first.faces)  # same image and seed: same mesh

        refusals = {
            "unreadable image": {"image": base64.b64encode(b"not an image at all").decode()},
            "neither base64 image bytes nor a path": {"image": "???"},
            "seed must be an integer": {"image": image, "seed": 1.5},
            "num_inference_steps": {"image": image, "num_inference_steps": 0},
            "resolution must be in [16, 1024]": {"image": image, "resolution": 4},
        }
        for reason, record in refusals.items():
            status, body = _post(base + "/invocations", {"dataframe_records": [record]})
            assert status == 400, (reason, status, body)
            assert reason in body.get("message", ""), (reason, body)
            assert "row 0" in body["message"], body

        status, body = _post(base + "/invocations", good)  # the server survived every refusal
        assert status == 200 and len(_glb_mesh(body["predictions"][0]).faces) == len(first.faces)
    finally:
        stop_mlflow_server(proc)  # the server's whole process group
