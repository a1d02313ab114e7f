"""Render sheet of the procedural corpus: a few objects of every category, each rendered by
the data job's own renderer from two of its views (the condition images a row gets).

    python benchmarks/synth_sheet.py --per-category 3 --out docs/img/synth_corpus.png
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-category", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=96, help="pixels per image")
    p.add_argument("--photo-dir", default="", help="as `mar3d data synth --photo-dir`")
    p.add_argument("--out", type=Path, default=Path("synth_corpus.png"))
    args = p.parse_args(argv)
    from PIL import Image

    from mar3d.data.config import DataConfig
    from mar3d.data.mesh_io import load_mesh
    from mar3d.data.render import render_views
    from mar3d.data.synth import CATEGORIES, SynthConfig, _photo_files, make_object

    cfg = SynthConfig(num_objects=len(CATEGORIES) * args.per_category, seed=args.seed, photo_dir=args.photo_dir)
    data = DataConfig(render_views=4, render_resolution=args.size)
    photos = _photo_files(cfg.photo_dir)
    columns: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(cfg.num_objects):
            glb, record = make_object(index, cfg, photos)
            path = Path(tmp) / f"{record['uid']}.glb"
            path.write_bytes(glb)
            mesh = load_mesh(path, data.max_faces, data.max_file_bytes)
            views = render_views(mesh, data.view_angles(), data.render_resolution, data.render_fov_deg,
                                 data.render_fit_margin, data.render_ambient, True, "y").images
            tile = np.concatenate([views[0, ..., :3], views[2, ..., :3]], 0)
            columns.setdefault(record["categories"][0], []).append(tile)
    sheet = np.concatenate([np.concatenate(tiles, 0) for _, tiles in sorted(columns.items())], 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(args.out)
    print(f"{args.out}: {len(columns)} categories x {args.per_category} objects x 2 views")
    return args.out


if __name__ == "__main__":
    main()
