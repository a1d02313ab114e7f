"""The job's state in its output: result rows and ``results.parquet``, which items an
earlier run finished, and the settings an output folder is bound to."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from mar3d import storage
from mar3d.generate.config import DETERMINISTIC_REASONS, MESHES, RESULTS, SETTINGS, GenerateConfig
from mar3d.generate.inputs import ITEM_LABELS

RESULTS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("input", pa.string()),            # path, or path#row=N (Parquet), or path#uid=U&view=V
    ("source_uid", pa.string()),       # shard inputs: the Objaverse uid / XL fileIdentifier, else null
    ("category", pa.string()),         # shard inputs: the object's LVIS category, else null
    ("status", pa.string()),           # "ok" | "error"
    ("reason", pa.string()),           # null when ok; a short code otherwise (see the mar3d.generate doc)
    ("error", pa.string()),            # human-readable message; null when ok
    ("seed", pa.int64()),
    ("outputs", pa.list_(pa.string())),  # mesh files relative to the output folder
    ("level", pa.string()),            # "hr" | "lr": which token level was decoded
    ("num_vertices", pa.int64()),
    ("num_faces", pa.int64()),
    ("load_seconds", pa.float64()),    # reading + validating the image
    ("sample_seconds", pa.float64()),  # MAR-LR (+ MAR-HR) token sampling
    ("decode_seconds", pa.float64()),  # VAE decoding + marching cubes
    ("write_seconds", pa.float64()),
    ("seconds", pa.float64()),         # whole item
    ("model", pa.string()),            # resolved model URI (alias pinned to a version)
    ("worker", pa.string()),           # host:pid of the actor (or "driver")
    ("fingerprint", pa.string()),      # input file size:mtime[:row[:view]] when processed
    ("finished_at", pa.string()),      # UTC ISO time
])


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _result_row(item: dict, status: str, *, reason: str | None = None, error: str | None = None,
                outputs: Iterable[str] = (), model: str = "", worker: str = "driver",
                **extra: Any) -> dict:
    row = {name: None for name in RESULTS_SCHEMA.names}
    row.update({"id": item["id"] if item.get("id") is not None else item.get("raw_id"),
                "input": item["input"], "status": status, "reason": reason, "error": error,
                "seed": item["seed"] if item.get("seed", -1) >= 0 else None, "outputs": list(outputs),
                "model": model, "worker": worker, "fingerprint": item["fingerprint"],
                "finished_at": _now(), **{k: item.get(k) for k in ITEM_LABELS}})
    row.update(extra)
    return row


def mesh_paths(item_id: str, formats: Iterable[str]) -> list[str]:
    """Output-relative mesh paths of one item."""
    return [f"{MESHES}/{item_id}.{fmt}" for fmt in formats]


def read_results(output: str | Path) -> pa.Table:
    path = storage.join(output, RESULTS)
    if not storage.is_file(path):
        return RESULTS_SCHEMA.empty_table()
    from mar3d.data.schema import conform

    with storage.open_input(path) as f:
        return conform(pq.read_table(f), RESULTS_SCHEMA)  # older tables lack the label columns


def _write_results(output: Path | str, rows: dict[str, dict]) -> None:
    from mar3d.data.prepare.shards import _write_parquet_atomic

    table = pa.Table.from_pylist(sorted(rows.values(), key=lambda r: r["id"]), schema=RESULTS_SCHEMA)
    _write_parquet_atomic(table, storage.join(output, RESULTS), row_group_size=65536)


def _finished(prev: dict | None, item: dict, cfg: GenerateConfig, output: Path | str) -> bool:
    if prev is None or prev["fingerprint"] != item["fingerprint"]:  # new or changed input
        return False
    if prev["status"] == "ok":
        return all(storage.is_file(storage.join(output, p)) for p in mesh_paths(item["id"], cfg.formats))
    return not cfg.retry_errors and prev["reason"] in DETERMINISTIC_REASONS


def _check_settings(output: Path | str, settings: dict) -> None:
    path = storage.join(output, SETTINGS)
    if storage.is_file(path):
        previous = json.loads(storage.read_bytes(path))
        diff = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{output} holds results of other settings ({', '.join(diff)} differ: "
                             f"{ {k: previous.get(k) for k in diff} } vs { {k: settings.get(k) for k in diff} }); "
                             "use a new output folder")
        return
    storage.write_bytes(path, json.dumps(settings, indent=2).encode())
