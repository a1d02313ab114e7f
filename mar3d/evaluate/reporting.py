"""The evaluation's files and tables: per-object CSV, Chamfer matrices, previews, contact
sheets, strict JSON, and the Markdown table printed after a run."""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from mar3d.evaluate.config import GROUP_DESCRIPTIONS, GROUPS, SHEET_DIR, VIEW_DIR, EvalConfig, EvalResult
from mar3d.evaluate.scoring import _GroupScoring
from mar3d.metrics import DEFAULT_THRESHOLD


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become null (their meaning is in the doc)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_table(per_object: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for r in per_object:
        columns += [k for k in r if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(per_object)


def _preview(row: dict[str, Any], record: dict[str, Any], mesh, cfg: EvalConfig, path: Path) -> None:
    from PIL import Image

    from mar3d.preview import comparison_preview

    surface = np.asarray(row["surface"], np.float64)
    if record["status"] == "ok":
        caption = (f"{record['uid']}  CD {record['chamfer']:.4f}  F {record['f_score']:.3f}  "
                   f"NC {record['normal_consistency']:.3f}")
    else:
        caption = f"{record['uid']}  FAILED: {record['error'][:60]}"
    image = comparison_preview(row["image"], mesh, surface[:, :3], surface[:, 3:],
                               row["world_to_cam"], row["intrinsics"],
                               image_resolution=row["image"].shape[1],
                               resolution=cfg.preview_resolution, caption=caption)
    Image.fromarray(image).save(path)


def _sheet_caption(record: dict[str, Any], nearest: str | None) -> str:
    name = record["uid"][17:] if re.match(r"^[0-9a-f]{16}-", record["uid"]) else record["uid"]
    if record["status"] != "ok":
        return f"{name}: FAILED {record['error'][:70]}"
    mark = "own GT nearest" if nearest == record["uid"] else f"nearest GT: {(nearest or '-')[17:]}"
    return f"{name}  CD {record['chamfer']:.3f}  F {record['f_score']:.2f}  ({mark})"


def _group_contact_sheet(ctx: _GroupScoring, group, group_rows, scored, nearest, candidate: dict,
                         baseline: dict) -> Path:
    """Condition image | generated mesh | ground truth per object, with the group's scores."""
    from PIL import Image

    from mar3d.preview import contact_sheet, contact_sheet_row

    sheet_rows = []
    for row, record, mesh, near in zip(group_rows, scored.records, scored.meshes, nearest):
        surface = np.asarray(row["surface"], np.float64)
        sheet_rows.append(contact_sheet_row(
            row["image"], mesh, (surface[:, :3], surface[:, 3:]), row["world_to_cam"],
            row["intrinsics"], ctx.up_axis, ctx.cfg.contact_sheet_resolution,
            caption=_sheet_caption(record, near)))
    title = _group_title(group, candidate, baseline)
    path = ctx.output / SHEET_DIR / f"{group.name}.png"
    Image.fromarray(contact_sheet(sheet_rows, title=title, columns=2)).save(path)
    return path


def _group_title(group, candidate: dict, baseline: dict) -> str:
    return (f"{group.name} ({GROUP_DESCRIPTIONS[group.name]}), view {group.view}: "
            f"F {candidate['f_score']:.3f} vs mean-shape {baseline.get('f_score', float('nan')):.3f}, "
            f"retrieval {int(candidate['retrieval_hits'])}/{len(group.indices)}, "
            f"diversity {candidate['diversity_ratio'] or 0:.2f}"
            + (f", category accuracy {candidate['category_accuracy']:.2f}"
               if "category_accuracy" in candidate else ""))


def _group_view_page(ctx: _GroupScoring, group, group_rows, scored, nearest, candidate: dict,
                     baseline: dict) -> Path:
    """The group as a page of rotatable shapes (:mod:`mar3d.viewer`): per object its
    condition image, the generated mesh and the ground-truth surface points, turning
    together, captioned with the object's scores; failures with their reason."""
    from mar3d.viewer import Panel, mesh_shape, points_shape, write_page

    panels = []
    for row, record, mesh, near in zip(group_rows, scored.records, scored.meshes, nearest):
        ok = record["status"] == "ok" and mesh is not None and len(mesh.faces) > 0
        shapes = [mesh_shape(mesh, "generated")] if ok else []
        shapes.append(points_shape(np.asarray(row["surface"])[:, :3], "ground truth"))
        caption = _sheet_caption(record, near) if ok else ""
        if record.get("category"):
            caption = f"category {record['category']}  {caption}".strip()
        panels.append(Panel(title=record["uid"], caption=caption,
                            image=row["image"], shapes=shapes,
                            error=None if ok else f"generation failed: {record.get('error') or 'empty mesh'}"))
    path = ctx.output / VIEW_DIR / f"{group.name}.html"
    write_page(panels, path, title=f"evaluation: {group.name}",
               subtitle=_group_title(group, candidate, baseline) + f"\nmodel {ctx.model}",
               up_axis=ctx.up_axis)
    return path


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_matrix(path: Path, uids: list[str], matrix: np.ndarray) -> None:
    """Rows: generated mesh of each object; columns: ground truths; +inf for a failure."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["generated \\ ground truth", *uids])
        for uid, row in zip(uids, matrix):
            writer.writerow([uid, *(f"{v:.6f}" if math.isfinite(v) else "inf" for v in row)])


TABLE_METRICS = (("f_score", "F-score@{t} ↑"), ("chamfer", "Chamfer ↓"), ("normal_consistency", "normal cons. ↑"),
                 ("iou", "volume IoU ↑"), ("retrieval_top1", "top-1 retrieval ↑"),
                 ("category_accuracy", "category accuracy ↑"),
                 ("diversity_ratio", "diversity ratio"), ("vae_iou", "VAE recon. IoU (ceiling)"))


def evaluation_table(result: EvalResult | dict[str, float], threshold: float = DEFAULT_THRESHOLD) -> str:
    """Markdown table of every group: candidate next to its baseline (and champion)."""
    metrics = result.metrics if isinstance(result, EvalResult) else result
    groups = [g for g in GROUPS if f"{g}/num_objects" in metrics]
    lines = []
    for group in groups:
        n = int(metrics[f"{group}/num_objects"])
        columns = [("candidate", ""), ("mean-shape baseline", "baseline/"), ("champion", "champion/")]
        columns = [(name, p) for name, p in columns if f"{group}/{p}num_objects" in metrics]
        lines += [f"{group} ({GROUP_DESCRIPTIONS[group]}, {n} objects, chance retrieval 1/{n})",
                  "| metric | " + " | ".join(name for name, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for key, label in TABLE_METRICS:
            values = [metrics.get(f"{group}/{p}{key}") for _, p in columns]
            if all(v is None for v in values):
                continue
            cells = ["-" if v is None else (f"{int(metrics[f'{group}/{p}retrieval_hits'])}/{n}"
                                            if key == "retrieval_top1" else f"{v:.4f}")
                     for v, (_, p) in zip(values, columns)]
            lines.append(f"| {label.format(t=threshold)} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()
