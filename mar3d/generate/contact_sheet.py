"""``contact_sheet.png``: the job's results as one picture (input | generated |
ground truth), in the dataset's up axis."""
from __future__ import annotations

import io
from pathlib import Path

from mar3d import storage
from mar3d.generate.config import CONTACT_SHEET, GenerateConfig
from mar3d.generate.inputs import ItemReader


def write_contact_sheet(output: Path | str, rows: dict[str, dict], items: list[dict],
                        cfg: GenerateConfig, up_axis: str = "y") -> Path | str | None:
    """``OUTPUT/contact_sheet.png``: input | generated mesh (from the input's camera when
    the input is a dataset view, else a default one, and turned 90 degrees) | ground truth
    when known, for the first ``contact_sheet_items`` listed items (errors included, with
    their reason). Returns the path, or None when there is nothing to show."""
    import numpy as np
    from PIL import Image

    from mar3d.inference import load_image
    from mar3d.preview import contact_sheet, contact_sheet_row

    reader = ItemReader()
    shown = [it for it in items if it.get("id") in rows][: cfg.contact_sheet_items]
    sheet_rows = []
    for it in shown:
        row = rows[it["id"]]
        try:
            rgba = load_image(reader.image(it), cfg.pipeline)
        except Exception:  # noqa: BLE001 - an unreadable input is shown as an empty panel
            rgba = np.full((64, 64, 4), 255, np.uint8)
        mesh = None
        if row["status"] == "ok":
            mesh_file = next((storage.join(output, p) for p in row["outputs"]
                              if storage.is_file(storage.join(output, p))), None)
            mesh = _load_mesh(mesh_file) if mesh_file else None
        truth = reader.truth(it)
        gt = None if truth is None else (truth["surface"][:, :3], truth["surface"][:, 3:])
        caption = it["id"] if row["status"] == "ok" else f"{it['id']}: {row['reason']}"
        sheet_rows.append(contact_sheet_row(
            rgba, mesh, gt, truth and truth["world_to_cam"], truth and truth["intrinsics"], up_axis,
            cfg.contact_sheet_resolution, caption=caption[:90]))
    if not sheet_rows:
        return None
    path = storage.join(output, CONTACT_SHEET) if storage.is_remote(output) else output / CONTACT_SHEET
    title = f"{len(shown)} of {len(items)} items, model {rows[shown[0]['id']].get('model') or ''}"
    buf = io.BytesIO()
    Image.fromarray(contact_sheet(sheet_rows, title=title, columns=3)).save(buf, format="PNG")
    storage.write_bytes(path, buf.getvalue())
    return path


def _load_mesh(location: Path | str):
    """trimesh needs a file with the right suffix: a remote mesh is read from a local copy."""
    import tempfile

    import trimesh

    if not storage.is_remote(location):
        return trimesh.load(location, force="mesh")
    with tempfile.TemporaryDirectory(prefix="mar3d-mesh-") as tmp:
        return trimesh.load(storage.download(location, Path(tmp) / storage.name(location)), force="mesh")


def _up_axis(images: str | Path, cfg: GenerateConfig) -> str:
    from mar3d.data.prepare import load_manifest

    if cfg.up_axis != "auto":
        return cfg.up_axis
    manifest = load_manifest(images) if Path(images).is_dir() else None
    return (manifest or {}).get("config", {}).get("render_up_axis", "y")
