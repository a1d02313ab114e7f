"""The cluster path against a real multi-node Ray cluster (`mar3d cluster up --local`):
nodes and their resources, steps as Ray jobs (failure reasons, SIGINT/SIGTERM), and the
whole pipeline submitted step by step through the Jobs API."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from components._run import StepFailed, run_step
from mar3d.cluster import job_client

pytestmark = pytest.mark.e2e

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _wait_status(client, submission_id: str, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = str(client.get_job_status(submission_id).value)
        if status in wanted:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {submission_id} not in {wanted} after {timeout:.0f} s (last {status})")


def test_cluster_nodes_have_their_own_resources_and_temp_dirs(cluster_env):
    cluster = cluster_env
    client = job_client(cluster.dashboard_url)
    code = ("import json, ray; ray.init(); "
            "print('NODES', json.dumps([n['Resources'] for n in ray.nodes() if n['Alive']]))")
    sid = client.submit_job(entrypoint=f"python -c {json.dumps(code)}")
    assert _wait_status(client, sid, TERMINAL, 120) == "SUCCEEDED", client.get_job_logs(sid)
    line = next(ln for ln in client.get_job_logs(sid).splitlines() if ln.startswith("NODES "))
    resources = json.loads(line[len("NODES "):])
    assert len(resources) == 2
    assert sorted(k for r in resources for k in r if k.startswith("mar3d_node_")) == \
        ["mar3d_node_0", "mar3d_node_1"]
    assert len({n.temp_dir for n in cluster.nodes}) == 2
    for node in cluster.nodes:
        assert cluster.raylet_pid(node.name) > 0


def test_cluster_refuses_a_second_up_on_the_same_state_dir(ray_cluster):
    from mar3d.cluster import ClusterError, up

    with pytest.raises(ClusterError, match="already running"):
        up(2, state_dir=ray_cluster.state_dir)


def test_failed_step_reports_its_reason_and_last_log_lines(cluster_env, tmp_path):
    argv = ["mar3d", "data", "prepare", "--input", str(tmp_path / "no-such-meshes"),
            "--output", str(tmp_path / "out")]
    with pytest.raises(StepFailed) as info:
        run_step(argv, cluster_env.dashboard_url, poll_seconds=0.5)
    message = str(info.value)
    assert "FAILED" in message and "exit code 1" in message
    assert "--- last log lines ---" in message
    assert f"the mesh input {tmp_path / 'no-such-meshes'} does not exist" in message


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_submitting_step_stops_its_ray_job(cluster_env, ycb_root, tmp_path, sig):
    """Cancelling a step (kfp pod deleted, Ctrl-C) must not leave its Ray job running."""
    client = job_client(cluster_env.dashboard_url)
    before = {j.submission_id for j in client.list_jobs()}
    # All 78 YCB objects: minutes of work, so the job is surely still running when signalled.
    script = textwrap.dedent(f"""
        from components._run import run_step
        run_step(["mar3d", "data", "prepare", "--input", {str(ycb_root)!r},
                  "--output", {str(tmp_path / 'out')!r}], {cluster_env.dashboard_url!r},
                 poll_seconds=0.5)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        job = None
        while job is None and time.monotonic() < deadline:
            new = [j for j in client.list_jobs() if j.submission_id not in before]
            job = next((j for j in new if str(j.status.value) == "RUNNING" and j.driver_info), None)
            time.sleep(0.5)
        assert job is not None, "the step's Ray job never started running"
        driver_pid = int(job.driver_info.pid)
        assert job.metadata["mar3d.step"] == "data prepare"
        time.sleep(3)  # inside the job's work, not just its start
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert f"step interrupted ({sig.name}); stopped its Ray job {job.submission_id}" in out
    assert str(client.get_job_status(job.submission_id).value) == "STOPPED"
    gone = psutil.wait_procs([psutil.Process(driver_pid)] if psutil.pid_exists(driver_pid) else [],
                             timeout=30)[1]
    assert not gone, f"the job's driver (pid {driver_pid}) outlived the stopped job"


def test_pipeline_failure_names_the_step_and_its_reason(cluster_env, ycb_small_dir, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    code = textwrap.dedent(f"""
        import sys
        from pipelines.orchestrate import run_local
        try:
            run_local({str(ycb_small_dir)!r}, {str(tmp_path / 'work')!r}, preset="smoke",
                      ray_address={cluster_env.dashboard_url!r},
                      extra={{"data_overrides": ["no_such_setting=1"]}})
        except Exception as exc:
            print("PIPELINE-ERROR", type(exc).__name__, exc)
            sys.exit(1)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    message = proc.stdout[proc.stdout.index("PIPELINE-ERROR"):]
    assert "StepFailed" in message and "Inner task failed: 'prepare'" in message
    assert "`mar3d data prepare` failed: Ray job" in message
    assert "no_such_setting" in message  # the config error itself, from the job's log
