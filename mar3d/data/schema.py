"""Parquet shard schema v1 and numpy <-> Arrow conversion.

One row per mesh. Tensor columns use Arrow's canonical ``fixed_shape_tensor`` extension
type, so plain pyarrow reads them back with ``column.combine_chunks().to_numpy_ndarray()``
(shape [rows, *tensor_shape]); the shapes are fixed per dataset by its DataConfig.

| column | type | meaning |
|---|---|---|
| uid | string | first 16 hex of sha256(file) + "-" + stem |
| source_path | string | input path as given (absolute) |
| source_sha256 | string | sha256 of the input file bytes |
| transform | float32 [4,4] | original coords -> normalized coords in [-1,1]^3 |
| surface_{k} | float32 [N_k,6] | xyz + unit normal on the watertight surface; k=0 finest |
|  |  | (on the input surface with "snap", epsilon outside it with "offset") |
| vol_points / vol_labels | float32 [Nv,3] / uint8 [Nv] | uniform in [-b,b]^3; 1 = inside |
| near_points / near_labels | float32 [Nn,3] / uint8 [Nn] | surface + N(0, sigma^2) noise |
| images | uint8 [V,H,W,4] | RGBA renders of the original textured mesh |
| cam_world_to_cam | float32 [V,4,4] | OpenCV camera (x right, y down, z forward) |
| cam_intrinsics | float32 [V,3,3] | pixels = K @ camera coords (pixel centres at +0.5) |
| view_elev_azim | float32 [V,2] | degrees |
| source_uid | string, nullable | the Objaverse uid, or the Objaverse-XL fileIdentifier |
| category | string, nullable | the object's LVIS category (Objaverse trees) |
| name | string, nullable | the object's name (Objaverse metadata) |
| license | string, nullable | the object's license (Objaverse metadata or XL table) |
| source | string, nullable | where source_uid comes from: "objaverse-1.0", or the XL table's source |
| notes | string, nullable | what the loader left out of the file and why (a skybox dropped...), or null |

The label columns (``LABEL_COLUMNS``) are null for plain folders and manifests. Shards
written before they existed lack them: readers must select columns (``label_columns``
says which of them a shard has), never assume the full set, and a run into such a
dataset keeps its schema (``shard_schema(cfg, with_labels=False)``). The same holds for
``notes`` (``shard_schema(cfg, with_notes=False)``).

Schema metadata: ``mar3d_schema_version`` and ``mar3d_watertight_method`` (the
DataConfig.watertight_method that made the geometry columns; datasets written before
the field existed were all made by "offset").

``errors.parquet`` (ERRORS_SCHEMA) holds one row per input that could not become a row;
``conform`` reads tables written before a nullable column was added.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .config import SCHEMA_VERSION, DataConfig

ERRORS_SCHEMA = pa.schema([
    ("source_path", pa.string()),
    ("source_sha256", pa.string()),  # null when the file could not be read at all
    ("uid", pa.string()),
    ("reason", pa.string()),  # a key of errors.REASONS
    ("message", pa.string()),
    ("source_uid", pa.string()),  # the Objaverse uid / XL fileIdentifier, where known
])

# Where a row came from, so it can be joined back to Objaverse's uids, categories and
# licenses; all nullable strings, null where the input does not say.
LABEL_COLUMNS = ("source_uid", "category", "name", "license", "source")
# What the loader changed about the file, so that a row whose mesh is not the whole file
# (a skybox or ground plane dropped) says so.
NOTES = "notes"


def tensor_type(value_type: pa.DataType, shape: tuple[int, ...]) -> pa.DataType:
    return pa.fixed_shape_tensor(value_type, list(shape))


def tensor_shapes(cfg: DataConfig) -> dict[str, tuple[pa.DataType, tuple[int, ...]]]:
    views, res = cfg.render_views, cfg.render_resolution
    shapes: dict[str, tuple[pa.DataType, tuple[int, ...]]] = {"transform": (pa.float32(), (4, 4))}
    for k, n in enumerate(cfg.surface_sizes):
        shapes[f"surface_{k}"] = (pa.float32(), (n, 6))
    shapes.update({
        "vol_points": (pa.float32(), (cfg.num_vol, 3)),
        "vol_labels": (pa.uint8(), (cfg.num_vol,)),
        "near_points": (pa.float32(), (cfg.num_near, 3)),
        "near_labels": (pa.uint8(), (cfg.num_near,)),
        "images": (pa.uint8(), (views, res, res, 4)),
        "cam_world_to_cam": (pa.float32(), (views, 4, 4)),
        "cam_intrinsics": (pa.float32(), (views, 3, 3)),
        "view_elev_azim": (pa.float32(), (views, 2)),
    })
    return shapes


def shard_schema(cfg: DataConfig, with_labels: bool = True, with_notes: bool = True) -> pa.Schema:
    """The shard schema of ``cfg``; ``with_labels=False`` / ``with_notes=False`` is the schema
    of datasets written before the label columns / the notes column existed (a run into
    one keeps it: one schema per dataset)."""
    fields = [pa.field("uid", pa.string(), nullable=False),
              pa.field("source_path", pa.string(), nullable=False),
              pa.field("source_sha256", pa.string(), nullable=False)]
    for name, (vt, shape) in tensor_shapes(cfg).items():
        fields.append(pa.field(name, tensor_type(vt, shape), nullable=False))
    if with_labels:
        fields += [pa.field(name, pa.string(), nullable=True) for name in LABEL_COLUMNS]
    if with_notes:
        fields.append(pa.field(NOTES, pa.string(), nullable=True))
    # The watertight method decides what the geometry columns describe (the object itself
    # or its epsilon offset), so every shard says which one made it.
    return pa.schema(fields, metadata={b"mar3d_schema_version": str(SCHEMA_VERSION).encode(),
                                       b"mar3d_watertight_method": cfg.watertight_method.encode()})


def label_columns(schema: pa.Schema, wanted: tuple[str, ...] = LABEL_COLUMNS) -> list[str]:
    """The ``wanted`` label columns that a shard of ``schema`` has (older shards have none)."""
    return [name for name in wanted if name in schema.names]


def row_labels(values: dict) -> dict:
    """Every label column of a row from ``values`` (missing or empty values are null)."""
    return {name: values.get(name) or None for name in LABEL_COLUMNS}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema``: columns a newer schema added (nullable) are filled with nulls,
    so files written before them stay readable; a missing non-nullable column is an error."""
    for field in schema:
        if field.name not in table.column_names:
            if not field.nullable:
                raise ValueError(f"table lacks the column {field.name!r} ({table.column_names})")
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def _numpy_dtype(value_type: pa.DataType) -> np.dtype:
    return np.dtype(value_type.to_pandas_dtype())


def rows_to_batch(rows: list[dict], schema: pa.Schema) -> pa.RecordBatch:
    """Record batch from row dicts of numpy arrays/strings; shapes and dtypes are checked
    against the schema so a wrong row fails loudly instead of corrupting a shard."""
    arrays = []
    for field in schema:
        # A nullable column a row lacks is null (rows made before the column existed).
        values = [r.get(field.name) if field.nullable else r[field.name] for r in rows]
        if isinstance(field.type, pa.FixedShapeTensorType):
            shape = tuple(field.type.shape)
            dtype = _numpy_dtype(field.type.value_type)
            stacked = []
            for r, v in zip(rows, values):
                v = np.asarray(v)
                if v.shape != shape:
                    raise ValueError(f"{r.get('uid')}: column {field.name} has shape {v.shape}, "
                                     f"schema wants {shape}")
                stacked.append(v.astype(dtype, copy=False))
            arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(np.stack(stacked))))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def column_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """[rows, *shape] numpy array from a fixed_shape_tensor column (plain pyarrow)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.to_numpy_ndarray()


def table_row(table: pa.Table, index: int = 0) -> dict:
    """One row of a shard table as {name: numpy array | str}."""
    out = {}
    for name in table.column_names:
        col = table.column(name).slice(index, 1)
        if isinstance(col.type, pa.FixedShapeTensorType):
            out[name] = column_to_numpy(col)[0]
        else:
            out[name] = col[0].as_py()
    return out
