"""Input discovery: a folder, Parquet file/folder, shard dataset or single image ->
items (ids, seeds, fingerprints: references, no pixels), and reading an item's pixels
(and ground truth) by reference where it is generated."""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mar3d import storage
from mar3d.generate.config import IMAGE_SUFFIXES, GenerateConfig

log = logging.getLogger(__name__)

# Labels of a shard row that its results keep (see RESULTS_SCHEMA).
ITEM_LABELS = ("source_uid", "category")
# Item fields passed through Ray (plain strings and ints: cheap to ship, no pixels).
ITEM_FIELDS = ("id", "kind", "source", "row", "view", "column", "input", "fingerprint", "seed",
               *ITEM_LABELS)


def item_seed(item_id: str, base_seed: int = 0) -> int:
    """Per-item seed: ``base_seed`` + stable 32-bit hash of the id, mod 2^32."""
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:4], "big")
    return (base_seed + h) % 2 ** 32


def _fingerprint(path: Path, *extra: int) -> str:
    st = path.stat()
    return ":".join([str(st.st_size), str(st.st_mtime_ns), *map(str, extra)])


def _item(raw_id: str, kind: str, source: Path, input_desc: str, fingerprint: str,
          row: int = -1, view: int = -1, column: str = "", labels: dict | None = None) -> dict:
    return {"raw_id": raw_id, "kind": kind, "source": str(source), "row": row, "view": view,
            "column": column, "input": input_desc, "fingerprint": fingerprint,
            **{k: (labels or {}).get(k) for k in ITEM_LABELS}}


def _image_column(schema: pa.Schema, path: Path) -> str:
    if "image" not in schema.names:
        raise ValueError(f"{path}: Parquet input needs an 'image' column (encoded image bytes); "
                         f"columns are {schema.names}")
    t = schema.field("image").type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "image"
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        return "image.bytes"  # Hugging Face datasets' Image feature
    raise ValueError(f"{path}: column 'image' must be binary (encoded bytes) or a struct with "
                     f"'bytes', got {t}")


def _list_parquet(files: list[Path], root: Path) -> list[dict]:
    items = []
    for path in files:
        pf = pq.ParquetFile(path)
        column = _image_column(pf.schema_arrow, path)
        ids: list[Any] = [None] * pf.metadata.num_rows
        if "id" in pf.schema_arrow.names:
            ids = pf.read(columns=["id"]).column("id").to_pylist()
        stem = path.relative_to(root).with_suffix("").as_posix() if path != root else path.stem
        for row, given in enumerate(ids):
            raw = str(given) if given is not None else f"{stem}-{row:06d}"
            items.append(_item(raw, "parquet", path, f"{path}#row={row}", _fingerprint(path, row),
                               row=row, column=column))
    return items


def _list_shards(root: Path, cfg: GenerateConfig) -> list[dict]:
    from mar3d.data.prepare import complete_shards, load_manifest
    from mar3d.data.schema import label_columns

    manifest = load_manifest(root)
    num_views = int(manifest["config"]["render_views"])
    if not cfg.all_views and cfg.view_index >= num_views:
        raise ValueError(f"view_index {cfg.view_index} is outside the {num_views} views stored in {root}")
    views = range(num_views) if cfg.all_views else [cfg.view_index]
    items = []
    left_out = 0
    for entry in complete_shards(root, manifest, verify=False):
        path = root / entry["file"]
        present = label_columns(pq.read_schema(path), (*ITEM_LABELS, "source"))  # older shards: none
        rows = pq.read_table(path, columns=["uid", *present]).to_pylist()
        for row, labels in enumerate(rows):  # shards hold one row per row group
            if cfg.exclude_sources and labels.get("source") in cfg.exclude_sources:
                left_out += 1
                continue
            uid = labels["uid"]
            for v in views:
                items.append(_item(f"{uid}_v{v}", "shard", path, f"{path}#uid={uid}&view={v}",
                                   _fingerprint(path, row, v), row=row, view=v, column="images",
                                   labels=labels))
    if left_out:
        log.info("%d rows of %s left out: their source is one of exclude_sources %s",
                 left_out, root, list(cfg.exclude_sources))
    return items


def _walk_files(root: Path, exclude: Path | None) -> list[Path]:
    """Every file under ``root`` (following links), sorted; ``exclude`` (an output folder
    inside the input folder) is not input."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if exclude is not None:
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != exclude]
        found.extend(here / name for name in filenames)
    return sorted(found)


def _list_folder(root: Path, files: list[Path]) -> list[dict]:
    items = []
    for path in files:
        kind = "file" if path.suffix.lower() in IMAGE_SUFFIXES else "not_image"
        try:
            fp = _fingerprint(path)
        except OSError:  # a dangling link: still one row (the actor reports it missing)
            fp = "missing"
        items.append(_item(path.relative_to(root).as_posix(), kind, path.absolute(),
                           str(path.absolute()), fp))
    return items


def list_inputs(images: str | Path, cfg: GenerateConfig, exclude: str | Path | None = None) -> list[dict]:
    """Items (sorted by id, before ``max_items``) of a folder, Parquet file/folder, shard
    dataset or single image. Each is a dict with ``id`` (safe, or None when refused),
    ``id_error``, ``kind`` ('file', 'parquet', 'shard' or 'not_image'), ``source``,
    ``row``, ``view``, ``column``, ``input``, ``fingerprint``, ``seed``."""
    root = Path(images)
    excl = Path(exclude).resolve() if exclude is not None else None
    if root.is_dir():
        if (root / "manifest.json").is_file() and (root / "shards").is_dir():
            raw = _list_shards(root, cfg)
        else:
            files = _walk_files(root, excl)
            if files and all(p.suffix.lower() == ".parquet" for p in files):
                raw = _list_parquet(files, root)
            else:
                raw = _list_folder(root, files)
    elif root.is_file():
        if root.suffix.lower() == ".parquet":
            raw = _list_parquet([root], root)
        elif root.suffix.lower() in IMAGE_SUFFIXES:
            raw = [_item(root.name, "file", root.absolute(), str(root.absolute()), _fingerprint(root))]
        else:
            raise ValueError(f"{root} is neither an image, a Parquet file nor a folder")
    else:
        raise FileNotFoundError(f"image input {root} does not exist")
    items = []
    for it in raw:
        try:
            item_id, id_error = storage.safe_name(it["raw_id"]), ""
        except ValueError as e:
            item_id, id_error = None, str(e)
        items.append({**it, "id": item_id, "id_error": id_error,
                      "seed": item_seed(item_id, cfg.base_seed) if item_id else -1})
    # Refused ids sort by their raw text, after the good ones.
    items.sort(key=lambda it: (it["id"] is None, it["id"] or it["raw_id"], it["input"]))
    return items[:cfg.max_items] if cfg.max_items else items


class ItemReader:
    """Reads an item's pixels (and, for shard items, its ground truth) by reference. The
    last file and row group are cached: consecutive items usually share them."""

    def __init__(self):
        self._file_cache: tuple[str, pq.ParquetFile, list[int]] | None = None
        self._group_cache: tuple[tuple[str, int, tuple[str, ...]], pa.Table] | None = None

    def row_group_table(self, source: str, row: int, columns: list[str]) -> tuple[pa.Table, int]:
        """The row group holding ``row`` (those columns) and the row's offset in it."""
        if self._file_cache is None or self._file_cache[0] != source:
            pf = pq.ParquetFile(source)
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            self._file_cache = (source, pf, sizes)
        _, pf, sizes = self._file_cache
        start = 0
        for g, n in enumerate(sizes):
            if row < start + n:
                key = (source, g, tuple(columns))
                if self._group_cache is None or self._group_cache[0] != key:
                    self._group_cache = (key, pf.read_row_group(g, columns=list(columns)))
                return self._group_cache[1], row - start
            start += n
        raise IndexError(f"{source} has {start} rows, no row {row}")

    def image(self, item: dict):
        """What :func:`mar3d.inference.load_image` takes: a path, encoded bytes or RGBA pixels."""
        from mar3d.data.schema import column_to_numpy
        from mar3d.inference import InvalidImageError

        kind = item["kind"]
        if kind == "file":
            if not Path(item["source"]).is_file():
                raise FileNotFoundError(f"image file {item['source']} does not exist (or is a dangling link)")
            return item["source"]  # load_image reads and validates the file
        table, offset = self.row_group_table(item["source"], item["row"], [item["column"].split(".")[0]])
        if kind == "parquet":
            value = table.column(0)[offset].as_py()
            if isinstance(value, dict):
                value = value.get("bytes")
            if not value:
                raise InvalidImageError("row has no image bytes (null or empty)")
            return value
        images = column_to_numpy(table.column(0).slice(offset, 1))[0]  # [V, H, W, 4]
        return images[item["view"]]

    def truth(self, item: dict) -> dict | None:
        """A shard item's ground-truth surface and the camera of its view; None otherwise."""
        from mar3d.data.schema import column_to_numpy

        if item["kind"] != "shard":
            return None
        columns = ["surface_0", "cam_world_to_cam", "cam_intrinsics"]
        table, offset = self.row_group_table(item["source"], item["row"], columns)
        row = {c: column_to_numpy(table.column(c).slice(offset, 1))[0] for c in columns}
        return {"surface": row["surface_0"], "world_to_cam": row["cam_world_to_cam"][item["view"]],
                "intrinsics": row["cam_intrinsics"][item["view"]]}
