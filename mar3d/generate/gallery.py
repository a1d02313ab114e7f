"""``gallery.html``: every result of a batch generation on one page of rotatable shapes
(:mod:`mar3d.viewer`): per item its input image, the generated mesh (and, for dataset
inputs, the ground-truth surface) turning together; error rows with their reason.

The page is built from ``results.parquet`` alone (each row names its input), so the job
and ``mar3d view`` write the same page, also for the results of an earlier run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from mar3d import storage
from mar3d.generate.config import GALLERY, MESH_FORMATS
from mar3d.generate.inputs import ItemReader, _image_column

log = logging.getLogger(__name__)


def item_from_input(description: str, sources: dict | None = None) -> dict:
    """The item a result row's ``input`` names (``path``, ``path#row=N`` for Parquet,
    ``path#uid=U&view=V`` for a shard dataset), as :class:`ItemReader` reads it.
    ``sources`` keeps each file's image column / uid order across the rows of one page."""
    sources = {} if sources is None else sources
    source, _, query = description.partition("#")
    fields = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    item = {"kind": "file", "source": source, "row": -1, "view": -1, "column": ""}
    if "row" in fields:
        if source not in sources:
            sources[source] = _image_column(pq.read_schema(source), Path(source))
        item.update(kind="parquet", row=int(fields["row"]), column=sources[source])
    elif "uid" in fields:
        if source not in sources:
            uids = pq.read_table(source, columns=["uid"]).column("uid").to_pylist()
            sources[source] = {uid: row for row, uid in enumerate(uids)}
        if fields["uid"] not in sources[source]:
            raise ValueError(f"{source} has no row with uid {fields['uid']!r}")
        item.update(kind="shard", row=sources[source][fields["uid"]], view=int(fields["view"]),
                    column="images")
    return item


def _mesh_location(output: Path | str, row: dict) -> Path | str | None:
    """The row's first mesh that exists, in the order GLB, OBJ, PLY."""
    by_format = {Path(p).suffix.lstrip("."): p for p in row["outputs"] or []}
    for fmt in MESH_FORMATS:
        if fmt in by_format and storage.is_file(storage.join(output, by_format[fmt])):
            return storage.join(output, by_format[fmt])
    return None


def _caption(row: dict) -> str:
    parts = [f"seed {row['seed']}" if row["seed"] is not None else "",
             row.get("category") and f"category {row['category']}",
             row["level"] and f"{row['level']} tokens",
             row["seconds"] is not None and f"{row['seconds']:.1f} s"]
    return "  ".join(p for p in parts if p)


def result_panel(row: dict, output: Path | str, reader: ItemReader, sources: dict | None = None):
    """One result row as a page panel; what cannot be shown is said in the panel."""
    from mar3d.generate.contact_sheet import _load_mesh
    from mar3d.inference import load_image
    from mar3d.viewer import Panel, mesh_shape, points_shape

    panel = Panel(title=row["id"], caption=_caption(row))
    notes = []
    try:
        item = item_from_input(row["input"], sources)
        panel.image = load_image(reader.image(item))
        truth = reader.truth(item)
    except Exception as e:  # noqa: BLE001 - an input that cannot be read is shown as a note
        item, truth = None, None
        if row["status"] == "ok":
            notes.append(f"input not shown: {type(e).__name__}: {e}")
    if row["status"] == "ok":
        location = _mesh_location(output, row)
        if location is None:
            panel.error = f"its mesh files {row['outputs']} are missing from {storage.display(output)}"
        else:
            try:
                panel.shapes.append(mesh_shape(_load_mesh(location), "generated"))
            except Exception as e:  # noqa: BLE001 - listed with its reason
                panel.error = f"mesh {storage.name(location)} could not be read: {type(e).__name__}: {e}"
    else:
        panel.error = f"{row['reason']}: {row['error']}"
    if truth is not None:
        panel.shapes.append(points_shape(truth["surface"], "ground truth"))
    if notes:
        panel.caption = "  ".join([panel.caption, *notes]).strip()
    return panel


def write_gallery(output: Path | str, rows: list[dict] | None = None, up_axis: str = "y",
                  location: Path | str | None = None, progress: bool = False):
    """Write the gallery of ``output``'s results (``rows``, or its ``results.parquet``) to
    ``location`` (default ``OUTPUT/gallery.html``); returns the page's :class:`PageInfo`."""
    from mar3d.generate.results import read_results
    from mar3d.logs import progress_bar
    from mar3d.viewer import write_page

    rows = sorted(rows if rows is not None else read_results(output).to_pylist(), key=lambda r: r["id"])
    reader, sources = ItemReader(), {}
    bar = progress_bar(len(rows), "gallery", "result", enabled=progress)
    panels = []
    for row in rows:
        panels.append(result_panel(row, output, reader, sources))
        bar.update(1)
    bar.close()
    ok = sum(r["status"] == "ok" for r in rows)
    models = sorted({r["model"] for r in rows if r["model"]})
    if location is None:
        location = storage.join(output, GALLERY) if storage.is_remote(output) else Path(output) / GALLERY
    return write_page(panels, location, title=f"generated shapes: {storage.display(output)}",
                      subtitle=f"{len(rows)} results: {ok} meshes, {len(rows) - ok} errors; "
                               f"model {', '.join(models) or '-'}", up_axis=up_axis)
