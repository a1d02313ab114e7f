"""Render sheet of the GLB cases: every fixture of tests/test_glb_render.py (vertex colours
under a material, specular-glossiness with a palette texture, alpha modes, texture
transforms, skyboxes and ground planes) and a few procedural corpus objects, run through
the real data job (`prepare_dataset`), one tile per input with its condition renders
(views 0 and 1), its label, what it should show and the row's notes or error.

    python benchmarks/glb_render_sheet.py --out docs/img/glb_render_sheet.png
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fixtures are written by the tests' own builders

LABEL_LINES = 6


def write_cases(folder: Path) -> dict[str, str]:
    """Every test fixture as ``folder/NAME.glb``; returns NAME -> what its row should show."""
    from test_glb_render import CASES

    folder.mkdir(parents=True, exist_ok=True)
    for name, (make, _) in CASES.items():
        (folder / f"{name}.glb").write_bytes(make())
    return {name: want for name, (_, want) in CASES.items()}


def read_dataset(out: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(stem -> row {images, notes}, stem -> error {reason, message}) of a prepared dataset."""
    import pyarrow.parquet as pq

    from mar3d.data.prepare import complete_shards, read_errors
    from mar3d.data.schema import column_to_numpy

    rows = {}
    for shard in complete_shards(out):
        table = pq.read_table(out / shard["file"], columns=["source_path", "images", "notes"])
        images = column_to_numpy(table.column("images"))
        for path, views, notes in zip(table.column("source_path").to_pylist(), images,
                                      table.column("notes").to_pylist()):
            rows[Path(path).stem] = {"images": views, "notes": notes}
    errors = {Path(e["source_path"]).stem: e for e in read_errors(out).to_pylist()}
    return rows, errors


def tile(label: str, want: str, images: np.ndarray | None, note: str, size: int, views: int):
    """One tile: the views side by side (or a pink square for an error row) over text."""
    from PIL import Image, ImageDraw, ImageFont

    width = size * views
    if images is not None:
        top = np.concatenate([images[v, ..., :3] for v in range(views)], axis=1)
    else:
        top = np.full((size, width, 3), (250, 215, 215), np.uint8)
    font = ImageFont.load_default()
    chars = max(12, width // 6)
    lines = textwrap.wrap(label, chars)[:1] + textwrap.wrap(f"want: {want}", chars)[:1] + \
        textwrap.wrap(note, chars)[:LABEL_LINES - 2]
    text = Image.new("RGB", (width, 12 * LABEL_LINES + 4), (255, 255, 255))
    draw = ImageDraw.Draw(text)
    for k, line in enumerate(lines):
        draw.text((3, 2 + 12 * k), line, fill=(0, 0, 0) if k == 0 else (70, 70, 70), font=font)
    out = np.concatenate([top, np.asarray(text)], axis=0)
    out[:, -1] = out[-1] = 180  # a grey line between tiles
    return out


def sheet(tiles: list[np.ndarray], columns: int) -> np.ndarray:
    blank = np.full_like(tiles[0], 255)
    tiles = tiles + [blank] * (-len(tiles) % columns)
    return np.concatenate([np.concatenate(tiles[r:r + columns], axis=1)
                           for r in range(0, len(tiles), columns)], axis=0)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("glb_render_sheet.png"))
    p.add_argument("--size", type=int, default=96, help="render resolution (pixels per view)")
    p.add_argument("--synth", type=int, default=3, help="procedural corpus objects to add (0: none)")
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--work", type=Path, default=None, help="keep the inputs and the dataset here "
                                                          "(default: a temporary folder)")
    args = p.parse_args(argv)
    from PIL import Image

    from mar3d.data.config import small_test_config
    from mar3d.data.prepare import prepare_dataset

    views = 2
    cfg = small_test_config(render_resolution=args.size, render_views=views, synth_objects=args.synth,
                            surface_sizes=(512, 128, 32), num_vol=512, num_near=512)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        wants = write_cases(work / "input")
        result = prepare_dataset(work / "input", work / "data", cfg, progress=False)
        print(result.summary())
        rows, errors = read_dataset(work / "data")
    tiles = []
    for stem in sorted(set(rows) | set(errors), key=lambda s: (s not in wants, list(wants).index(s)
                                                               if s in wants else 0, s)):
        want = wants.get(stem, "a corpus object, textured")
        label = stem if stem in wants else f"synth {stem[:24]}"
        if stem in rows:
            note = f"notes: {rows[stem]['notes']}" if rows[stem]["notes"] else "row"
            tiles.append(tile(label, want, rows[stem]["images"], note, args.size, views))
        else:
            error = errors[stem]
            tiles.append(tile(label, want, None, f"error {error['reason']}: {error['message']}", args.size, views))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet(tiles, args.columns)).save(args.out)
    print(f"{args.out}: {len(rows)} rows, {len(errors)} errors, {len(tiles)} tiles")
    return args.out


if __name__ == "__main__":
    main()
