"""Input discovery: which mesh files a folder, a manifest of paths, an Objaverse layout
or an ``s3://`` prefix names (with their labels and promised hashes), the error rows for
entries that cannot be taken, and the content hash that gives each input its uid.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ... import storage
from ..config import MESH_SUFFIXES
from ..mesh_io import make_uid
from ..schema import row_labels
from ..sources import (Selection, SourceEntry, is_xl_table, object_paths_file, read_objaverse,
                       read_xl_table)
from .shards import _sha256_location, error_record

MANIFEST_SUFFIXES = (".json", ".jsonl", ".csv", ".txt", ".lst")


def _hash_item(item: dict) -> dict:
    """Content hash and uid of one input; a hash other than the ``expected_sha256`` its
    table promised (an empty one promises nothing) is a ``sha256_mismatch``."""
    path = item["source_path"]
    try:
        sha = _sha256_location(path)
    except OSError as e:
        return {**item, "sha256": "", "uid": "", "reason": "unreadable", "message": f"{type(e).__name__}: {e}"}
    expected = item.get("expected_sha256") or ""
    if expected and expected != sha:
        # Recorded without the file's hash: a corrected table must make the file eligible again.
        return {**item, "sha256": "", "uid": "", "reason": "sha256_mismatch",
                "message": f"the file's sha256 is {sha}, its table lists {expected}"}
    return {**item, "sha256": sha, "uid": make_uid(sha, path), "reason": "", "message": ""}


def _is_mesh_file(path: Path) -> bool:
    return path.suffix.lower() in MESH_SUFFIXES


@dataclass
class Inputs:
    """What discovery found: the mesh files to hash and process, the inputs that already
    failed, and what the input layout says about each file."""
    paths: list[str]                                          # sorted absolute paths (or URIs)
    errors: list[dict] = field(default_factory=list)          # error records
    labels: dict[str, dict] = field(default_factory=dict)     # path -> label columns
    expected_sha256: dict[str, str] = field(default_factory=dict)  # path -> hash its table lists

    def labels_of(self, path: str) -> dict:
        return row_labels(self.labels.get(path, {}))


def discover_inputs(source: str | Path) -> tuple[list[str], list[dict]]:
    """(sorted absolute mesh paths, error records) of any input ``find_inputs`` takes."""
    inputs = find_inputs(source)
    return inputs.paths, inputs.errors


def find_inputs(source: str | Path, selection: Selection = Selection()) -> Inputs:
    """The inputs of a directory of meshes, a manifest file, an Objaverse 1.0 tree (its
    root folder or its ``object-paths.json[.gz]``) or an Objaverse-XL table (``.parquet``,
    or ``.csv`` with a ``fileIdentifier`` column); an ``s3://`` prefix gives the sorted
    URIs of the mesh files under it. ``selection`` applies to the Objaverse layouts only:
    the others have no source uids to select by, so it is refused there."""
    if storage.is_remote(source):
        if not storage.is_dir(source):
            raise FileNotFoundError(f"input {source} is not a prefix holding objects (manifest files "
                                    "are supported for local inputs; give the meshes' prefix)")
        _refuse_selection(selection, source, "an s3:// prefix of meshes")
        return Inputs([u for u in storage.list_files(source) if _is_mesh_file(Path(u))])
    source = Path(source)
    listing = object_paths_file(source)
    if listing is not None:
        return _entries_to_inputs(read_objaverse(listing, selection), listing)
    if source.is_dir():
        _refuse_selection(selection, source, "a folder of meshes")
        return Inputs(_walk_meshes(source))
    if source.is_file() and is_xl_table(source):
        return _entries_to_inputs(read_xl_table(source, selection), source)
    if source.is_file():
        _refuse_selection(selection, source, "a manifest of paths")
        paths, errors = _read_manifest(source)
        return Inputs(paths, errors)
    raise FileNotFoundError(f"input {source} is neither a directory nor a manifest file")


def merge_inputs(found: list[Inputs]) -> Inputs:
    """Several inputs as one: paths sorted (a file two inputs list is taken once)."""
    merged = Inputs([])
    for inputs in found:
        merged.errors += inputs.errors
        merged.labels.update(inputs.labels)
        merged.expected_sha256.update(inputs.expected_sha256)
    merged.paths = sorted({p for inputs in found for p in inputs.paths})
    return merged


def _refuse_selection(selection: Selection, source, kind: str) -> None:
    if not selection.is_empty():
        raise ValueError(f"input {source} is {kind}: selecting by category, uid list or limit "
                         "needs an Objaverse 1.0 tree or an Objaverse-XL table")


def _walk_meshes(root: Path) -> list[str]:
    found = set()
    for dirpath, _, filenames in os.walk(root, followlinks=True):
        for name in filenames:
            p = Path(dirpath) / name
            if _is_mesh_file(p):
                found.add(str(p.absolute()))
    return sorted(found)


def _entries_to_inputs(entries: list[SourceEntry], listing: Path) -> Inputs:
    """Objaverse entries -> inputs: their files checked like manifest entries (inside the
    listing's folder, existing, listed once); entries without a file are not_found rows."""
    root = listing.parent.resolve()
    inputs, found = Inputs([]), set()
    for entry in entries:
        if entry.path is None:
            inputs.errors.append(error_record(
                f"{listing}#{entry.source_uid}", "not_found",
                f"{entry.source_uid!r} has no file in {listing.name} (not listed, or not downloaded)",
                source_uid=entry.source_uid))
            continue
        resolved, error = _check_listed(entry.path, root, found, listing.name)
        if error is not None:
            inputs.errors.append({**error, "source_uid": entry.source_uid})
            continue
        found.add(resolved)
        inputs.labels[resolved] = entry.labels
        if entry.sha256:
            inputs.expected_sha256[resolved] = entry.sha256
    inputs.paths = sorted(found)
    return inputs


def _manifest_entries(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    text = path.read_text()
    if suffix not in MANIFEST_SUFFIXES:
        raise ValueError(f"manifest {path} must end in one of {MANIFEST_SUFFIXES}")

    def entry(value) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return value["path"]
        raise ValueError(f"manifest {path}: entry {value!r} is neither a path nor {{'path': ...}}")

    if suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("paths", data.get("meshes"))
        if not isinstance(data, list):
            raise ValueError(f"manifest {path}: expected a list (or {{'paths': [...]}})")
        return [entry(v) for v in data]
    if suffix == ".jsonl":
        return [entry(json.loads(line)) for line in text.splitlines() if line.strip()]
    if suffix == ".csv":
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        if "path" in header:
            col = header.index("path")
            return [r[col] for r in rows[1:] if len(r) > col and r[col].strip()]
        return [r[0] for r in rows if r and r[0].strip()]
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _read_manifest(path: Path) -> tuple[list[str], list[dict]]:
    root = path.parent.resolve()
    found, errors = set(), []
    for raw in _manifest_entries(path):
        resolved, error = _check_listed(raw, root, found, "the manifest")
        if error is not None:
            errors.append(error)
        else:
            found.add(resolved)
    return sorted(found), errors


def _check_listed(raw: str, root: Path, found: set[str], lister: str) -> tuple[str | None, dict | None]:
    """(resolved path, None) for a listed file that exists inside ``root`` and is not in
    ``found`` yet, else (None, its error record). ``lister`` names the list in messages."""
    candidate = Path(raw)
    try:
        resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
        is_file = resolved.is_file()
    except (OSError, ValueError) as e:  # NUL bytes, names longer than the OS allows
        shown = raw if len(raw) <= 200 else raw[:200] + f"... ({len(raw)} characters)"
        return None, error_record(raw, "invalid_path", f"{shown!r}: {type(e).__name__}: {e}")
    if not resolved.is_relative_to(root):
        return None, error_record(raw, "path_outside_root",
                                  f"{raw!r} resolves to {resolved}, outside {lister}'s root {root}")
    if not is_file:
        return None, error_record(str(resolved), "not_found", f"{raw!r} does not exist or is not a file")
    if str(resolved) in found:
        return None, error_record(raw, "duplicate", f"{raw!r} names {resolved}, which {lister} "
                                                    "already lists (processed once)")
    return str(resolved), None
