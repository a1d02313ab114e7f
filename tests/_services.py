"""Real local services for tests: an `mlflow server` on 127.0.0.1 that a test can start,
stop (to simulate an outage) and start again on the same port and database, with or
without MLflow's basic-auth app."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The auth app's settings, as k8s/README.md ships them (READ for what an account did not
# create; credential checks cached for a minute).
AUTH_INI = """[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""


def start_mlflow_server(root: Path, port: int | None = None, artifact_args: list[str] | None = None,
                        admin_password: str | None = None) -> tuple[str, subprocess.Popen]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend + local artifact store under
    ``root``, or the artifact options ``artifact_args``), healthy when this returns; its
    own process group, so it can be stopped with all its workers (:func:`stop_mlflow_server`).
    ``admin_password``: run MLflow's basic-auth app, with user ``admin`` its admin."""
    port = port or _free_port()
    artifact_args = artifact_args or ["--artifacts-destination", str(root / "artifacts")]
    exe = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    log = open(root / "server.log", "a")
    # Without MLflow's job runner (GenAI jobs, which mar3d never submits): its ~8 extra
    # processes tripled the server's start-up CPU (~65 s vs ~24 s on 2 loaded cores, so
    # that it missed the 120 s deadline) and kept polling at ~0.3-0.5 core while idle.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    auth_args = []
    if admin_password:
        (root / "basic_auth.ini").write_text(AUTH_INI.format(db=root / "basic_auth.db"))
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"), MLFLOW_AUTH_ADMIN_USERNAME="admin",
                   MLFLOW_AUTH_ADMIN_PASSWORD=admin_password, MLFLOW_FLASK_SERVER_SECRET_KEY=os.urandom(16).hex())
        auth_args = ["--app-name", "basic-auth"]
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         *artifact_args, "--workers", "1", *auth_args],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_until_answers(uri + "/health", proc, root / "server.log", 120, "mlflow server")
    return uri, proc


def wait_until_answers(url: str, proc: subprocess.Popen, log: Path, seconds: float, what: str) -> None:
    """Return once ``url`` answers 200; a server process that exits first, or is not
    answering after ``seconds`` (then stopped), raises with the end of its ``log``."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    stop_mlflow_server(proc)
    raise RuntimeError(f"{what} did not answer {url} in {seconds:.0f} s: {log.read_text()[-2000:]}")


def stop_mlflow_server(proc: subprocess.Popen, timeout: float = 20) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass




def add_mlflow_user(uri: str, admin_password: str, username: str, password: str) -> None:
    """``username`` made an account of the server at ``uri`` by its admin, the way an
    operator makes one: `mar3d tracking add-user`."""
    env = {**os.environ, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": admin_password,
           "MAR3D_USER_PASSWORD": password}
    done = subprocess.run([sys.executable, "-m", "mar3d", "tracking", "add-user", username, "--tracking-uri", uri],
                          env=env, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"add-user {username} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
