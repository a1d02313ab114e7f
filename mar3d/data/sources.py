"""Objaverse layouts as inputs of the data job: which objects, where their files are, and
the labels (uid, category, name, license, source) their rows keep.

Two layouts, both read from disk only (no network):

- an **Objaverse 1.0 tree** (as the ``objaverse`` package's Hugging Face dataset has it):
  ``object-paths.json.gz`` ({uid: "glbs/000-NNN/<uid>.glb"}, relative to the tree's root),
  optionally ``lvis-annotations.json.gz`` ({category: [uid, ...]}) and
  ``metadata/000-NNN.json.gz`` ({uid: {"name", "license", ...}}, one per glbs folder);
  the uncompressed ``.json`` names work too;
- an **Objaverse-XL annotations table** (Parquet, or CSV with a ``fileIdentifier``
  column): ``fileIdentifier``, ``sha256``, ``source``, ``license`` as Objaverse-XL's
  annotations name them, plus ``local_path``, where the downloaded file is, relative to
  the table's folder (an empty one means not downloaded).

A ``Selection`` picks objects by LVIS category (trees only), by a list of source uids and
by a limit: the first N of the selected uids in sorted order, so a limit picks the same
objects on every machine and every run. The readers return one ``SourceEntry`` per
selected object, also for objects whose file is missing or not listed at all: the job
turns those into error rows instead of dropping them.
"""
from __future__ import annotations

import csv
import difflib
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .. import storage

OBJECT_PATHS = ("object-paths.json.gz", "object-paths.json")
LVIS_ANNOTATIONS = ("lvis-annotations.json.gz", "lvis-annotations.json")
METADATA_DIR = "metadata"
# The ``source`` label of rows from a 1.0 tree, unless an object's metadata names its own
# (a procedural corpus in this layout does: mar3d.data.synth.SYNTH_SOURCE).
OBJAVERSE_SOURCE = "objaverse-1.0"

XL_UID = "fileIdentifier"
XL_PATH = "local_path"  # relative to the table's folder, like manifest entries
XL_LABELS = ("sha256", "source", "license")
XL_SUFFIXES = (".parquet", ".csv")


@dataclass(frozen=True)
class Selection:
    categories: tuple[str, ...] = ()
    uids: frozenset[str] | None = None  # None: every uid
    limit: int | None = None

    def is_empty(self) -> bool:
        return not self.categories and self.uids is None and self.limit is None

    @classmethod
    def from_config(cls, cfg) -> "Selection":
        """The selection of a DataConfig (``select_*``); reads its uid file."""
        uids = read_uid_list(cfg.select_uids_file) if cfg.select_uids_file else None
        return cls(tuple(cfg.select_categories), uids, cfg.select_limit)


@dataclass
class SourceEntry:
    """One selected object: its source uid, its file (relative to the layout's root; None
    when the layout does not list it) and the labels its row keeps."""
    source_uid: str
    path: str | None
    labels: dict
    sha256: str | None = None  # the content hash the layout promises, checked when given


def read_uid_list(location: str) -> frozenset[str]:
    """Uids of a text file, one per line; blank lines and lines starting with ``#`` are
    ignored (only whole lines: an XL fileIdentifier is a URL and may contain ``#``)."""
    text = storage.read_bytes(location).decode("utf-8")
    uids = (line.strip() for line in text.splitlines())
    return frozenset(u for u in uids if u and not u.startswith("#"))


def select_uids(listed: Iterable[str], selection: Selection,
                in_categories: set[str] | None = None) -> list[str]:
    """The sorted uids ``selection`` picks: the uid list's (listed or not: the job reports
    an unlisted one), else every ``listed`` one; only those ``in_categories`` when given;
    then the first ``limit``."""
    chosen = set(listed) if selection.uids is None else set(selection.uids)
    if in_categories is not None:
        chosen &= in_categories
    ordered = sorted(chosen)
    return ordered[: selection.limit] if selection.limit else ordered


# ------------------------------------------------------------------ Objaverse 1.0 trees
def object_paths_file(source: Path) -> Path | None:
    """The ``object-paths.json[.gz]`` of an Objaverse tree given as its root folder or as
    that file; None when ``source`` is not one."""
    if source.is_file():
        return source if source.name in OBJECT_PATHS else None
    return _first_existing(source, OBJECT_PATHS) if source.is_dir() else None


def _read_json(path: Path):
    data = path.read_bytes()
    try:
        return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not readable {'gzipped ' if path.suffix == '.gz' else ''}"
                         f"JSON: {type(e).__name__}: {e}") from e


def _first_existing(folder: Path, names: Iterable[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _json_object(path: Path, what: str) -> dict:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


def categories_by_uid(lvis: dict) -> dict[str, list[str]]:
    """{uid: its sorted LVIS categories} from {category: [uid, ...]}."""
    out: dict[str, list[str]] = {}
    for category in sorted(lvis):
        for uid in lvis[category] or []:
            out.setdefault(uid, []).append(category)
    return out


def check_categories(wanted: Iterable[str], known: Iterable[str]) -> None:
    """Refuse category names the annotations do not have (a typo would select nothing)."""
    known = sorted(known)
    unknown = sorted(set(wanted) - set(known))
    if not unknown:
        return
    hints = {c: difflib.get_close_matches(c, known, n=3) for c in unknown}
    close = "; ".join(f"{c!r}: did you mean {m}?" for c, m in hints.items() if m)
    raise ValueError(f"unknown LVIS categories {unknown} ({len(known)} known, e.g. {known[:8]})"
                     + (f"; {close}" if close else ""))


def _category(categories: list[str], selected: tuple[str, ...]) -> str | None:
    """One category per row: the first selected one of the object's, else its first
    (Objaverse's LVIS annotations list each object under one category)."""
    chosen = [c for c in categories if c in selected] or categories
    return chosen[0] if chosen else None


def _metadata_name(relative: str) -> str:
    """The metadata file stem of an object path: ``glbs/000-023/x.glb`` -> ``000-023``."""
    return Path(relative).parent.name


class _MetadataFiles:
    """``metadata/<folder>.json[.gz]`` loaded on first use: a selection reads only the
    files of its folders (the full tree has 160 of them)."""

    def __init__(self, root: Path):
        self.folder = root / METADATA_DIR
        self.loaded: dict[str, dict] = {}

    def get(self, name: str, uid: str) -> dict:
        if name not in self.loaded:
            path = _first_existing(self.folder, (f"{name}.json.gz", f"{name}.json"))
            self.loaded[name] = _json_object(path, "uid -> metadata") if path else {}
        record = self.loaded[name].get(uid)
        return record if isinstance(record, dict) else {}


def read_objaverse(object_paths: Path, selection: Selection = Selection()) -> list[SourceEntry]:
    """The selected objects of the Objaverse tree whose ``object-paths.json[.gz]`` is
    ``object_paths``, sorted by uid. Raises ValueError for unknown category names, or
    categories without the tree's LVIS annotations."""
    root = object_paths.parent
    paths = _json_object(object_paths, "uid -> path")
    lvis_file = _first_existing(root, LVIS_ANNOTATIONS)
    if selection.categories and lvis_file is None:
        raise ValueError(f"--categories needs the tree's {LVIS_ANNOTATIONS[0]}, which {root} lacks")
    lvis = _json_object(lvis_file, "category -> uids") if lvis_file else {}
    check_categories(selection.categories, lvis)
    categories = categories_by_uid(lvis)
    in_categories = None
    if selection.categories:
        in_categories = {u for c in selection.categories for u in lvis[c] or []}
    metadata = _MetadataFiles(root)
    entries = []
    for uid in select_uids(paths, selection, in_categories):
        relative = paths.get(uid)
        relative = relative if isinstance(relative, str) and relative else None
        meta = metadata.get(_metadata_name(relative), uid) if relative else {}
        labels = {"source_uid": uid, "category": _category(categories.get(uid, []), selection.categories),
                  "name": _text(meta.get("name")), "license": _text(meta.get("license")),
                  "source": _text(meta.get("source")) or OBJAVERSE_SOURCE}
        entries.append(SourceEntry(uid, relative, labels))
    return entries


def _text(value) -> str | None:
    return str(value) if value not in (None, "") else None


# -------------------------------------------------------------- Objaverse-XL tables
def is_xl_table(path: Path) -> bool:
    """A Parquet file, or a CSV file whose header has ``fileIdentifier`` (a CSV without
    it is a plain manifest)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return True
    if suffix != ".csv":
        return False
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return XL_UID in [h.strip() for h in header]


def _xl_records(path: Path) -> list[dict]:
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        wanted = [c for c in (XL_UID, XL_PATH, *XL_LABELS) if c in columns]
        if XL_UID not in columns or XL_PATH not in columns:
            raise ValueError(f"Objaverse-XL table {path} needs the columns {XL_UID!r} and {XL_PATH!r} "
                             f"(the downloaded file, relative to the table's folder); it has {columns}")
        return pq.read_table(path, columns=wanted).to_pylist()
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    if rows and XL_PATH not in columns:
        raise ValueError(f"Objaverse-XL table {path} needs a {XL_PATH!r} column (the downloaded "
                         f"file, relative to the table's folder); it has {columns}")
    return [{k.strip(): v for k, v in r.items() if k is not None} for r in rows]


def read_xl_table(path: Path, selection: Selection = Selection()) -> list[SourceEntry]:
    """The selected rows of an Objaverse-XL annotations table, sorted by fileIdentifier
    (table order among equal ones). Raises ValueError for --categories (XL has none)."""
    if selection.categories:
        raise ValueError(f"--categories selects LVIS categories of an Objaverse 1.0 tree; the "
                         f"Objaverse-XL table {path} has no categories (select with --uids)")
    by_uid: dict[str, list[dict]] = {}
    for record in _xl_records(path):
        uid = _text(record.get(XL_UID))
        if uid is None:
            raise ValueError(f"Objaverse-XL table {path}: a row has no {XL_UID}: {record}")
        by_uid.setdefault(uid, []).append(record)
    entries = []
    for uid in select_uids(by_uid, selection):
        for record in by_uid.get(uid) or [{}]:
            labels = {"source_uid": uid, "category": None, "name": None,
                      "license": _text(record.get("license")), "source": _text(record.get("source"))}
            sha = _text(record.get("sha256"))
            entries.append(SourceEntry(uid, _text(record.get(XL_PATH)), labels,
                                       sha.lower() if sha else None))
    return entries
