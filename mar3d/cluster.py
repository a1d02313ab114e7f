"""A real multi-node Ray cluster on this machine: ``ray start --head`` plus worker nodes.

`mar3d cluster up --local --nodes N` gives users and tests the same thing a KubeRay
RayCluster gives: a head with the dashboard and the Jobs API, and N-1 worker nodes that
joined it with ``ray start --address``. Each node is a separate set of Ray processes with
its own temp dir, its own free ports and its own custom resource (``mar3d_node_<i>``), so
work can be pinned to a node and a node can be killed on its own (fault tests).

Everything binds to 127.0.0.1, and the cluster uses Ray's token authentication with a
token of its own (``<state dir>/auth_token``): clients find it through the two variables
that :meth:`LocalCluster.client_env` returns (`cluster up` prints them as ``export`` lines).

The cluster's description is a JSON file in its state dir; `cluster down` stops exactly the
processes of that cluster (never ``ray stop``, which would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mar3d import storage

STATE_FILE = "cluster.json"
DEFAULT_STATE_DIR = Path(os.environ.get("MAR3D_CLUSTER_DIR", Path.home() / ".cache" / "mar3d" / "cluster"))
HOST = "127.0.0.1"
# Unix socket paths live under each node's temp dir and must stay below ~107 bytes, so the
# temp dirs are short folders under /tmp rather than under the (possibly deep) state dir.
TEMP_ROOT = Path("/tmp")


class ClusterError(RuntimeError):
    """A local cluster could not be started, found or stopped."""


@dataclass
class NodeInfo:
    name: str            # "head", "worker-1", ...
    resource: str        # custom resource that pins work to this node
    temp_dir: str        # Ray's --temp-dir for this node (sessions, logs, sockets)
    num_cpus: int
    log: str             # output of its `ray start`


@dataclass
class LocalCluster:
    state_dir: str
    gcs_address: str     # HOST:port, what `ray start --address` and ray.init take
    dashboard_url: str   # http://HOST:port, the Jobs API address
    token_path: str
    temp_root: str       # parent of the nodes' temp dirs
    nodes: list[NodeInfo] = field(default_factory=list)

    # ---- persistence ---------------------------------------------------------------
    def save(self) -> None:
        storage.write_bytes(Path(self.state_dir) / STATE_FILE, json.dumps(asdict(self), indent=2).encode())

    @classmethod
    def load(cls, state_dir: str | Path = DEFAULT_STATE_DIR) -> "LocalCluster":
        path = Path(state_dir) / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"no local cluster recorded in {state_dir} (start one with "
                               "`mar3d cluster up --local`)")
        doc = json.loads(path.read_text())
        doc["nodes"] = [NodeInfo(**n) for n in doc["nodes"]]
        return cls(**doc)

    # ---- what clients need ---------------------------------------------------------
    def client_env(self) -> dict[str, str]:
        """Environment variables a Ray client (ray.init, JobSubmissionClient) needs here."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def node(self, name: str) -> NodeInfo:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterError(f"cluster has no node {name!r}; nodes: {[n.name for n in self.nodes]}")

    def summary(self) -> str:
        lines = [f"local Ray cluster: {len(self.nodes)} nodes on {HOST}",
                 f"  Jobs API / dashboard: {self.dashboard_url}",
                 f"  GCS address:          {self.gcs_address}"]
        lines += [f"  {n.name:<10} {n.num_cpus} CPU, resource {n.resource}, temp dir {n.temp_dir}"
                  for n in self.nodes]
        lines += ["clients need its auth token:"]
        lines += [f"  export {k}={v}" for k, v in self.client_env().items()]
        lines += [f"  e.g. mar3d pipeline run --ray-address {self.dashboard_url} --workdir outputs/cluster-run",
                  f"stop it: mar3d cluster down --state-dir {self.state_dir}"]
        return "\n".join(lines)

    # ---- processes -----------------------------------------------------------------
    def node_processes(self, name: str) -> list:
        """Every process of one node: those naming its temp dir, and their descendants
        (agents and workers rename themselves, so they are found through their parent)."""
        import psutil

        temp_dir = self.node(name).temp_dir + "/"
        roots = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(temp_dir in arg or arg.endswith(temp_dir[:-1]) for arg in proc.info["cmdline"] or []):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        found = {p.pid: p for p in roots}
        for proc in roots:
            try:
                found.update({c.pid: c for c in proc.children(recursive=True)})
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def raylet_pid(self, name: str) -> int:
        for proc in self.node_processes(name):
            try:
                if Path(proc.cmdline()[0]).name == "raylet":
                    return proc.pid
            except Exception:  # noqa: BLE001 - a process that ended while we looked
                continue
        raise ClusterError(f"node {name!r} has no running raylet")

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the node's raylet (what a lost machine looks like to Ray);
        returns the raylet's pid."""
        pid = self.raylet_pid(name)
        os.kill(pid, sig)
        return pid

    def remove_node(self, name: str) -> None:
        """Forget a (killed) worker node: SIGKILL whatever of it still runs."""
        if name == "head":
            raise ClusterError("the head cannot be removed; use `mar3d cluster down`")
        for proc in self.node_processes(name):
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.nodes = [n for n in self.nodes if n.name != name]
        self.save()

    def add_worker(self, num_cpus: int = 1, resource: str | None = None, timeout: float = 90) -> NodeInfo:
        """Join one more worker node (e.g. the replacement of a killed one: give it the
        dead node's ``resource`` and work pinned there can be scheduled again)."""
        index = 1 + max((int(n.temp_dir.rsplit("n", 1)[-1]) for n in self.nodes), default=0)
        node = NodeInfo(name=f"worker-{index}", resource=resource or f"mar3d_node_{index}",
                        temp_dir=_new_temp_dir(Path(self.temp_root), index),
                        num_cpus=num_cpus, log=str(Path(self.state_dir) / f"worker-{index}.log"))
        _ray_start(node, _node_env(self), ["--address", self.gcs_address] + _node_ports(head=False),
                   cwd=self.state_dir)
        self.nodes.append(node)
        self.save()
        wait_for_nodes(self, len(self.nodes), timeout)
        return node


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _node_ports(head: bool) -> list[str]:
    # Fixed defaults (6379, 8265, 52365, 10001, ...) would collide with a second node or a
    # second cluster on the same machine; worker ports 0 = any free port.
    ports = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()),
             "--dashboard-agent-grpc-port", str(free_port()),
             "--metrics-export-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()),
             "--min-worker-port", "0", "--max-worker-port", "0"]
    if head:
        ports += ["--ray-client-server-port", str(free_port())]
    return ports


def _new_temp_dir(root: Path, index: int) -> str:
    path = root / f"n{index}"
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _node_env(cluster: LocalCluster) -> dict[str, str]:
    env = dict(os.environ)
    # A cluster must not inherit the caller's connection or tracking settings: its job
    # drivers would otherwise talk to whatever the shell that started it pointed at.
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(cluster.client_env())
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Job entrypoints say `python`: on these nodes that must be this environment's Python
    # (a container image has only one; a laptop may have several on PATH).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _ray_start(node: NodeInfo, env: dict[str, str], extra: list[str], cwd: str) -> None:
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray) if ray.exists() else "ray", "start", "--node-ip-address", HOST,
           "--temp-dir", node.temp_dir, "--num-cpus", str(node.num_cpus),
           "--resources", json.dumps({node.resource: 1}), "--disable-usage-stats", *extra]
    with open(node.log, "w") as log:
        # Job drivers start in the head's working directory, and `python -m`/`-c` put it on
        # sys.path: started from /tmp, Ray's own /tmp/ray folder shadowed the ray package.
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=180, cwd=cwd)
    if proc.returncode != 0:
        tail = "".join(Path(node.log).read_text().splitlines(keepends=True)[-15:])
        raise ClusterError(f"`ray start` for node {node.name} failed (exit {proc.returncode}); "
                           f"last lines of {node.log}:\n{tail}")


def auth_headers() -> dict[str, str]:
    """The HTTP auth header for a token-authenticated cluster, from Ray's own variables
    (``RAY_AUTH_TOKEN`` or the file ``RAY_AUTH_TOKEN_PATH``); ``{}`` when neither is set.

    Passed explicitly because Ray caches the token of the first cluster a process talked
    to, and one test session talks to several."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    if not token and path:
        if not Path(path).is_file():
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path} does not exist")
        token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(address: str):
    """A Jobs API client for ``address`` that authenticates with this process's token."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=auth_headers() or None)


def wait_for_nodes(cluster: LocalCluster, count: int, timeout: float = 90) -> None:
    """Wait until ``count`` nodes are alive, asking the dashboard's node endpoint."""
    import urllib.request

    headers = {"Authorization": f"Bearer {Path(cluster.token_path).read_text().strip()}"}
    deadline = time.monotonic() + timeout
    alive, last_error = 0, ""
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(f"{cluster.dashboard_url}/nodes?view=summary", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as resp:
                doc = json.loads(resp.read())
            summary = doc.get("data", {}).get("summary", [])
            alive = sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")
            if alive >= count:
                return
        except Exception as exc:  # noqa: BLE001 - the dashboard is still starting
            last_error = str(exc)
        time.sleep(1.0)
    raise ClusterError(f"only {alive} of {count} nodes alive after {timeout:.0f}s"
                       + (f" (last error: {last_error})" if last_error else ""))


def up(nodes: int = 2, state_dir: str | Path = DEFAULT_STATE_DIR, cpus_per_node: int | None = None,
       object_store_mb: int = 512, timeout: float = 120) -> LocalCluster:
    """Start a head and ``nodes - 1`` worker nodes on this machine; returns the cluster."""
    if nodes < 1:
        raise ValueError(f"a cluster needs at least 1 node, got --nodes {nodes}")
    state_dir = Path(state_dir).expanduser().resolve()
    if (state_dir / STATE_FILE).is_file():
        existing = LocalCluster.load(state_dir)
        if any(existing.node_processes(n.name) for n in existing.nodes):
            raise ClusterError(f"a local cluster is already running from {state_dir} "
                               f"({existing.dashboard_url}); `mar3d cluster down` it first "
                               "or use another --state-dir")
    state_dir.mkdir(parents=True, exist_ok=True)
    cpus = cpus_per_node or max(1, (os.cpu_count() or 2) // nodes)
    token_path = state_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    temp_root = TEMP_ROOT / f"mar3d-ray-{os.getpid()}-{secrets.token_hex(3)}"
    gcs_port, dash_port = free_port(), free_port()
    cluster = LocalCluster(state_dir=str(state_dir), gcs_address=f"{HOST}:{gcs_port}",
                           dashboard_url=f"http://{HOST}:{dash_port}", token_path=str(token_path),
                           temp_root=str(temp_root))
    head = NodeInfo(name="head", resource="mar3d_node_0", temp_dir=_new_temp_dir(temp_root, 0),
                    num_cpus=cpus, log=str(state_dir / "head.log"))
    store = ["--object-store-memory", str(object_store_mb * 1024 * 1024)]
    _ray_start(head, _node_env(cluster),
               ["--head", "--port", str(gcs_port), "--dashboard-host", HOST,
                "--dashboard-port", str(dash_port), "--include-dashboard", "true",
                *store, *_node_ports(head=True)], cwd=str(state_dir))
    cluster.nodes.append(head)
    cluster.save()
    try:
        for index in range(1, nodes):
            node = NodeInfo(name=f"worker-{index}", resource=f"mar3d_node_{index}",
                            temp_dir=_new_temp_dir(temp_root, index), num_cpus=cpus,
                            log=str(state_dir / f"worker-{index}.log"))
            _ray_start(node, _node_env(cluster),
                       ["--address", cluster.gcs_address, *store, *_node_ports(head=False)],
                       cwd=str(state_dir))
            cluster.nodes.append(node)
            cluster.save()
        wait_for_nodes(cluster, nodes, timeout)
    except BaseException:
        down(state_dir)
        raise
    return cluster


def down(state_dir: str | Path = DEFAULT_STATE_DIR, grace_seconds: float = 10) -> int:
    """Stop every process of the cluster recorded in ``state_dir`` (workers first, then
    the head: SIGTERM, then SIGKILL after ``grace_seconds``); returns how many stopped."""
    import psutil

    cluster = LocalCluster.load(state_dir)
    procs = []
    for node in reversed(cluster.nodes):
        procs += cluster.node_processes(node.name)
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_seconds)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_seconds)
    shutil.rmtree(cluster.temp_root, ignore_errors=True)
    (Path(state_dir) / STATE_FILE).unlink(missing_ok=True)
    return len(procs)

