"""How the data job scales: procedural corpora of N objects through `mar3d data prepare`.

For every N (default 250, 1,000, 4,000) one corpus (`mar3d data synth`, seed 0, grown
once to the largest N) is prepared with the default data settings by the real command,
as a subprocess, while its process tree is sampled every 0.25 s:

* **meshes/s** (wall, the whole command: Ray start-up included) and **CPU s/mesh by
  stage** (load, watertight, sample, label, render: the tasks' own CPU seconds; write:
  the driver's shard writing), from the command's result;
* **peak RSS** of the driver process and of the largest other process of its tree
  (Ray's workers and daemons), which must stay flat as N grows;
* **shard sizes** (MB per shard, rows per shard).

``--resume N``: the same N again, its driver SIGKILLed (with its process group) once
about half of the rows are in complete shards, then the same command once more: the
dataset must equal the uninterrupted run's (same uids; every row's geometry and images
byte-identical). ``--cluster N``: the same N as a Ray job on a 2-node ``mar3d cluster up``
cluster through the Jobs API (``mar3d ray submit``).

    python benchmarks/data_scale.py --sizes 250 1000 4000 --resume 250 --cluster 1000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STAGES = ("load", "watertight", "sample", "label", "render", "write")
OBJAVERSE_800K = 800_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", type=int, nargs="*", default=[250, 1000, 4000])
    p.add_argument("--workdir", type=Path, default=Path("outputs/data_scale"))
    p.add_argument("--config", default="data", help="data preset or YAML (default: the default settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="data config overrides")
    p.add_argument("--resume", type=int, default=None, metavar="N", help="kill/resume check at this size")
    p.add_argument("--cluster", type=int, default=None, metavar="N", help="this size again on a 2-node cluster")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    return p.parse_args(argv)


def mar3d(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines", *args]


def prepare_argv(corpus: Path, output: Path, n: int, args, result: Path) -> list[str]:
    overrides = [x for kv in args.set for x in ("--set", kv)]
    return mar3d("data", "prepare", "--input", str(corpus), "--output", str(output), "--limit", str(n),
                 "--config", args.config, *overrides, "--no-progress", "--result-json", str(result))


def run_sampled(argv: list[str], log: Path, env: dict | None = None, kill_when=None) -> dict:
    """Run ``argv`` in its own process group, sampling RSS; ``kill_when()`` true -> SIGKILL."""
    import psutil

    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env, start_new_session=True)
    driver = psutil.Process(proc.pid)
    peak_driver = peak_other = 0
    killed = False
    while proc.poll() is None:
        try:
            peak_driver = max(peak_driver, driver.memory_info().rss)
            for child in driver.children(recursive=True):
                try:
                    peak_other = max(peak_other, child.memory_info().rss)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        if kill_when is not None and not killed and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.25)
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - start,
            "peak_driver_mb": peak_driver / 2**20, "peak_worker_mb": peak_other / 2**20, "killed": killed}


def manifest_rows(output: Path) -> int:
    try:
        doc = json.loads((output / "manifest.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(s["rows"] for s in doc.get("shards", []))


def shard_stats(output: Path) -> dict:
    doc = json.loads((output / "manifest.json").read_text())
    sizes = [s["bytes"] / 2**20 for s in doc["shards"]]
    return {"shards": len(sizes), "shard_mb_mean": sum(sizes) / len(sizes), "shard_mb_max": max(sizes),
            "rows_per_shard": sum(s["rows"] for s in doc["shards"]) / len(sizes)}


def row_digests(output: Path) -> dict[str, str]:
    """uid -> sha256 of every column of its row but the source path (folders differ)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mar3d.data.schema import column_to_numpy

    doc = json.loads((output / "manifest.json").read_text())
    digests = {}
    for shard in doc["shards"]:
        table = pq.read_table(output / shard["file"])
        columns = {name: (column_to_numpy(col) if isinstance(col.type, pa.ExtensionType) else col.to_pylist())
                   for name, col in zip(table.column_names, table.columns) if name != "source_path"}
        for i, uid in enumerate(columns["uid"]):
            h = hashlib.sha256()
            for name, values in sorted(columns.items()):
                value = values[i]
                h.update(np.ascontiguousarray(value).tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
            digests[uid] = h.hexdigest()
    return digests


def measure(corpus: Path, n: int, args, tag: str, env: dict | None = None, argv_prefix=None) -> dict:
    out = args.workdir / tag
    result_json = args.workdir / f"{tag}.json"
    argv = prepare_argv(corpus, out, n, args, result_json)
    if argv_prefix:
        argv = argv_prefix(argv)
    run = run_sampled(argv, args.workdir / f"{tag}.log", env=env)
    if run["returncode"] != 0:
        sys.exit(f"{tag} failed: see {args.workdir / (tag + '.log')}")
    result = json.loads(result_json.read_text()) if result_json.is_file() else {}
    return {"n": n, "tag": tag, **run, **result, **shard_stats(out)}


def resume_check(corpus: Path, n: int, args, reference: Path) -> dict:
    out = args.workdir / f"resume-{n}"
    argv = prepare_argv(corpus, out, n, args, args.workdir / f"resume-{n}.json")
    first = run_sampled(argv, args.workdir / f"resume-{n}-killed.log",
                        kill_when=lambda: manifest_rows(out) >= n // 2)
    rows_at_kill = manifest_rows(out)
    second = run_sampled(argv, args.workdir / f"resume-{n}-resumed.log")
    resumed = json.loads((args.workdir / f"resume-{n}.json").read_text())
    same = row_digests(out) == row_digests(reference)
    return {"n": n, "killed": first["killed"], "rows_at_kill": rows_at_kill, "resumed_processed": resumed["processed"],
            "skipped": resumed["skipped"], "rows": resumed["num_rows"], "identical_to_uninterrupted": same,
            "seconds_after_kill": second["seconds"]}


def cluster_run(corpus: Path, n: int, args) -> dict:
    """The N-object run as a Ray job on a 2-node local cluster (its workers are not
    children of the submitting client, so only the client's memory is sampled)."""
    state = args.workdir / "cluster"
    up = subprocess.run(mar3d("cluster", "up", "--local", "--nodes", "2", "--state-dir", str(state),
                              "--result-json", str(state / "up.json")), cwd=REPO, capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"cluster up failed:\n{up.stdout[-2000:]}{up.stderr[-2000:]}")
    try:
        from mar3d.cluster import LocalCluster

        cluster = LocalCluster.load(state)
        env = {**os.environ, **cluster.client_env()}
        return measure(corpus, n, args, f"cluster-{n}", env=env,
                       argv_prefix=lambda argv: as_ray_job(argv, cluster.dashboard_url))
    finally:
        subprocess.run(mar3d("cluster", "down", "--state-dir", str(state)), cwd=REPO, capture_output=True)


def as_ray_job(argv: list[str], address: str) -> list[str]:
    """`mar3d ray submit` of a local `mar3d ...` command: the stage's result comes back
    through the Jobs API, so --result-json moves to the submitting command."""
    stage = argv[3:]  # after [python, -m, pipelines]
    at = stage.index("--result-json")
    result = stage[at:at + 2]
    del stage[at:at + 2]
    return mar3d("ray", "submit", "--address", address, *result, "--", "mar3d", *stage)


def table(rows: list[dict]) -> str:
    head = ["run", "N", "wall s", "meshes/s", *[f"{s} CPU s/mesh" for s in STAGES], "peak driver MB",
            "peak worker MB", "shards", "MB/shard"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stages = r.get("stage_cpu_seconds", {})
        cells = [r["tag"], str(r["n"]), f"{r['seconds']:.0f}", f"{r['n'] / r['seconds']:.2f}",
                 *[f"{stages.get(s, 0.0) / r['n']:.3f}" for s in STAGES],
                 f"{r['peak_driver_mb']:.0f}", f"{r['peak_worker_mb']:.0f}", str(r["shards"]),
                 f"{r['shard_mb_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def objaverse_estimate(row: dict, cores_per_node: int = 32, hours: float = 24.0) -> str:
    cpu_per_mesh = sum(row.get("stage_cpu_seconds", {}).values()) / row["n"]
    cpu_hours = cpu_per_mesh * OBJAVERSE_800K / 3600
    nodes = cpu_hours / (cores_per_node * hours)
    return (f"Objaverse (800k objects) at {cpu_per_mesh:.2f} CPU s/mesh: {cpu_hours:,.0f} CPU-hours, "
            f"i.e. {nodes:.2f} nodes of {cores_per_node} cores for {hours:.0f} h (corpus meshes are small "
            "and closed; real Objaverse meshes are larger and mostly gridded)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()  # a Ray job runs in another working directory
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = args.workdir / "corpus"
    largest = max([*args.sizes, args.resume or 0, args.cluster or 0])
    subprocess.run(mar3d("data", "synth", "--output", str(corpus), "--num", str(largest), "--no-progress"),
                   cwd=REPO, check=True)
    rows = [measure(corpus, n, args, f"local-{n}") for n in args.sizes]
    report: dict = {"runs": rows}
    if args.resume:
        reference = args.workdir / f"local-{args.resume}"
        if not reference.is_dir():
            rows.append(measure(corpus, args.resume, args, f"local-{args.resume}"))
        report["resume"] = resume_check(corpus, args.resume, args, reference)
    if args.cluster:
        rows.append(cluster_run(corpus, args.cluster, args))
    print(table(rows))
    if "resume" in report:
        r = report["resume"]
        print(f"\nresume at N={r['n']}: driver SIGKILLed with {r['rows_at_kill']} rows in complete shards; "
              f"the re-run skipped {r['skipped']}, processed {r['resumed_processed']}, {r['rows']} rows; "
              f"identical to the uninterrupted run: {r['identical_to_uninterrupted']}")
    print("\n" + objaverse_estimate(max(rows, key=lambda r: r["n"])))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
