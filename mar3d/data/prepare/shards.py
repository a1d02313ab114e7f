"""A prepared dataset on disk: writing shards atomically, the manifest that makes them
complete, the errors table, reading them back, and removing what an interrupted run left.
"""
from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ... import storage
from ...config import from_dict, to_dict
from ..config import SCHEMA_VERSION, DataConfig
from ..mesh_io import sha256_file
from ..schema import ERRORS_SCHEMA, conform, shard_schema

MANIFEST = "manifest.json"
ERRORS = "errors.parquet"
SHARDS = "shards"


def error_record(source_path: str, reason: str, message: str, sha256: str | None = None,
                 uid: str | None = None, source_uid: str | None = None) -> dict:
    return {"source_path": source_path, "source_sha256": sha256, "uid": uid,
            "reason": reason, "message": message, "source_uid": source_uid or None}


def _sha256_location(location: str) -> str:
    if not storage.is_remote(location):
        return sha256_file(location)
    h = hashlib.sha256()
    with storage.open_input(location) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _write_parquet_atomic(table: pa.Table, path: Path | str, row_group_size: int) -> str:
    """Write ``table`` atomically to a local path or a URI; returns the file's sha256."""
    if storage.is_remote(path):
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=row_group_size, compression="zstd")
        data = sink.getvalue()
        storage.write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()
    with storage.atomic_local_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd")
        return sha256_file(tmp)


def write_shard(output: Path | str, name: str, batches: list[pa.RecordBatch], schema: pa.Schema) -> dict:
    """Write ``batches`` atomically as the shard ``output/name``; returns its manifest
    entry (file, rows, sha256, bytes)."""
    table = pa.Table.from_batches(batches, schema=schema)
    path = storage.join(output, name)
    # One row group per row: the reader fetches single rows without decoding a shard.
    sha = _write_parquet_atomic(table, path, row_group_size=1)
    return {"file": name, "rows": table.num_rows, "sha256": sha, "bytes": storage.size(path)}


def load_manifest(output: str | Path) -> dict | None:
    path = storage.join(output, MANIFEST)
    if not storage.is_file(path):
        return None
    return json.loads(storage.read_bytes(path))


def complete_shards(output: str | Path, manifest: dict | None = None, verify: bool = True) -> list[dict]:
    """Manifest shard entries whose file exists with the recorded size (and hash)."""
    manifest = manifest if manifest is not None else load_manifest(output)
    if manifest is None:
        return []
    good = []
    for entry in manifest.get("shards", []):
        p = storage.join(output, entry["file"])
        if storage.size(p) != entry["bytes"]:
            continue
        if verify and _sha256_location(p) != entry["sha256"]:
            continue
        good.append(entry)
    return good


def read_errors(output: str | Path) -> pa.Table:
    path = storage.join(output, ERRORS)
    if not storage.is_file(path):
        return ERRORS_SCHEMA.empty_table()
    with storage.open_input(path) as f:
        return conform(pq.read_table(f), ERRORS_SCHEMA)  # older files lack source_uid


def _clean_partial(output: Path | str, listed: set[str]) -> list[str]:
    removed = []
    shard_dir = storage.join(output, SHARDS)
    files = storage.list_files(shard_dir, recursive=False) if storage.is_dir(shard_dir) else []
    for p in files:
        rel = f"{SHARDS}/{storage.name(p)}"
        if storage.is_temporary(p) or rel not in listed:
            storage.delete(p)
            removed.append(rel)
    return removed + storage.remove_temporary(output)


def _manifest_doc(cfg: DataConfig, shards: list[dict], errors: pa.Table, inputs_seen: int,
                  schema: pa.Schema) -> dict:
    reasons: dict[str, int] = {}
    for r in errors.column("reason").to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    return {
        "format": "mar3d-shapes",
        "schema_version": SCHEMA_VERSION,
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": to_dict(cfg),
        "columns": {f.name: str(f.type) for f in schema},
        "counts": {"rows": sum(s["rows"] for s in shards), "errors": errors.num_rows,
                   "shards": len(shards), "inputs_last_run": inputs_seen},
        "error_reasons": reasons,
        "shards": shards,
        "errors_file": ERRORS,
    }


def _shapes_signature(cfg_dict: dict) -> str:
    cfg = from_dict(DataConfig, cfg_dict)
    return str(shard_schema(cfg).remove_metadata())


def watertight_method(manifest: dict) -> str:
    """The watertight method that made a prepared dataset (see DataConfig)."""
    # Manifests from before the option have no key; all of them were made by "offset".
    return manifest["config"].get("watertight_method", "offset")


class _ShardWriter:
    """Collects processed rows into shards of ``shard_size`` and, after every shard,
    rewrites errors.parquet and manifest.json (so an interrupted run loses at most the
    rows of the shard being filled)."""

    def __init__(self, output: Path | str, cfg: DataConfig, shards: list[dict], errors: pa.Table,
                 new_errors: list[dict], inputs_seen: int, with_labels: bool = True, with_notes: bool = True):
        self.output, self.cfg, self.shards, self.errors = output, cfg, shards, errors
        self.new_errors = list(new_errors)
        self.inputs_seen = inputs_seen
        self.with_labels, self.with_notes = with_labels, with_notes
        self.schema = shard_schema(cfg, with_labels, with_notes)
        self.next_index = 1 + max((int(s["file"].split("-")[-1].split(".")[0]) for s in shards), default=-1)
        self.buffer: list[pa.RecordBatch] = []
        self.written: list[str] = []
        self.failed = 0  # inputs that failed during processing

    def add_row(self, batch: pa.RecordBatch) -> None:
        self.buffer.append(batch)
        if len(self.buffer) >= self.cfg.shard_size:
            self.flush()

    def add_error(self, record: dict) -> None:
        self.new_errors.append(record)
        self.failed += 1

    def persist(self) -> None:
        if self.new_errors:
            self.errors = pa.concat_tables([self.errors, pa.Table.from_pylist(self.new_errors, schema=ERRORS_SCHEMA)])
            self.new_errors = []
        sink = io.BytesIO()
        pq.write_table(self.errors, sink)
        storage.write_bytes(storage.join(self.output, ERRORS), sink.getvalue())
        doc = _manifest_doc(self.cfg, self.shards, self.errors, self.inputs_seen, self.schema)
        storage.write_bytes(storage.join(self.output, MANIFEST), json.dumps(doc, indent=2).encode())

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"{SHARDS}/shard-{self.next_index:05d}.parquet"
        self.shards.append(write_shard(self.output, name, self.buffer, self.schema))
        self.written.append(name)
        self.next_index += 1
        self.buffer = []
        self.persist()
