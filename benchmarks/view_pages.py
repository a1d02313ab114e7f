"""Rotatable 3D pages (mar3d.viewer): size and opening time of a page of many meshes,
decimated for display against the full meshes (the baseline), in headless Chromium.

The page: every mesh of a folder (default: the 78 YCB scans, 16,384 faces each), one
panel per mesh with the mesh and 2,048 of its surface points (as an evaluation page
shows a generated mesh beside its ground truth). For each face budget the page is
built once (decimation + encoding, timed) and opened ``--repeats`` times in a fresh tab
of one headless Chromium, timing from navigation:

* ready: the page's script has listed its panels (Plotly parsed, paging set up);
* first view: the first 3D view has drawn;
* screen drawn: every view on the first screen (1280x900) has drawn.

Chromium runs WebGL on SwiftShader (the CPU) here, as in CI; a browser with a GPU draws
faster. Median of the repeats; ratios against the full meshes of the same run.

Example:
  python benchmarks/view_pages.py
  python benchmarks/view_pages.py --faces 1000 3000 0 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' Chromium settings


def _load(folder: Path, limit: int | None):
    import trimesh

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".obj", ".glb", ".ply", ".stl"))
    meshes = []
    for path in files[:limit]:
        mesh = trimesh.load(path, force="mesh", process=False)
        meshes.append((path.relative_to(folder).as_posix(), mesh, mesh.sample(20_000)))
    return meshes


def _build(meshes, max_faces: int, location: Path) -> tuple[float, int]:
    from mar3d.viewer import Panel, mesh_shape, points_shape, write_page

    start = time.perf_counter()
    panels = [Panel(name, f"{len(mesh.faces):,} faces",
                    shapes=[mesh_shape(mesh, "mesh", max_faces or len(mesh.faces)),
                            points_shape(points, "surface points")])
              for name, mesh, points in meshes]
    info = write_page(panels, location, f"{len(panels)} meshes", up_axis="z")
    return time.perf_counter() - start, info.bytes


def _open(browser, location: Path) -> tuple[float, float, float]:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(location.as_uri(), wait_until="commit")
        page.wait_for_function("() => window.mar3dDrawn && window.mar3dDrawn.length > 0", timeout=600_000)
        page.wait_for_function(
            "() => document.querySelectorAll('.mar3d-view[data-visible=\"1\"]:not([data-state=\"drawn\"])')"
            ".length === 0", timeout=600_000)
        ready, drawn = page.evaluate("() => [window.mar3dReady, window.mar3dDrawn]")
        return ready / 1000, drawn[0] / 1000, max(drawn) / 1000
    finally:
        page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meshes", type=Path, default=REPO.parent / "shared" / "datasets" / "ycb")
    parser.add_argument("--limit", type=int, default=None, help="only the first N meshes")
    parser.add_argument("--faces", type=int, nargs="+", default=[3000, 1000, 0],
                        help="display face budgets; 0 = the full meshes (the baseline)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from _browser import CHROMIUM, CHROMIUM_ARGS

    t0 = time.perf_counter()
    meshes = _load(args.meshes, args.limit)
    print(f"{len(meshes)} meshes loaded from {args.meshes} in {time.perf_counter() - t0:.1f} s")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for faces in args.faces:
            location = Path(tmp) / f"page-{faces}.html"
            build, size = _build(meshes, faces, location)
            timings = [_open(browser, location) for _ in range(args.repeats)]
            rows[faces] = (build, size, *(statistics.median(t[i] for t in timings) for i in range(3)))
        browser.close()
    base = rows.get(0)
    print("\n| faces per mesh | page MB | build s | ready s | first view s | first screen s | "
          "size vs full | first screen vs full |")
    print("|---|---|---|---|---|---|---|---|")
    for faces, (build, size, ready, first, screen) in rows.items():
        ratio = (f"{size / base[1]:.2f}", f"{screen / base[4]:.2f}") if base else ("-", "-")
        print(f"| {faces or 'full'} | {size / 1e6:.1f} | {build:.1f} | {ready:.2f} | {first:.2f} | "
              f"{screen:.2f} | {ratio[0]} | {ratio[1]} |")


if __name__ == "__main__":
    main()
