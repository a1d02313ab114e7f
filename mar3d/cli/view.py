"""`mar3d view`: a page of rotatable 3D shapes for meshes or a generation's results."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mar3d.cli.common import write_result

HELP = """\
Write one self-contained HTML page (Plotly's JavaScript inlined: it opens offline, from
a file) on which every shape turns with the mouse:

  a generation's output folder or its results.parquet
      -> the job's gallery (input image | generated mesh | ground truth for dataset
         inputs, errors with their reasons), by default OUTPUT/gallery.html;
  a mesh file (.glb .gltf .obj .ply .stl .off) or a folder of them (recursive)
      -> one view per mesh, by default ./<name>.html.

Meshes are decimated for display only (the files are untouched); the page shows 12
objects at a time and draws only the views on screen.

examples:
  mar3d view outputs/generated --open
  mar3d view outputs/generated/meshes/cup.glb -o cup.html
  mar3d view ../shared/datasets/ycb --up-axis z
"""


def _cmd_view(args: argparse.Namespace) -> int:
    from mar3d.generate import RESULTS, write_gallery
    from mar3d.viewer import write_mesh_page

    target = Path(args.target)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist")
    start = time.perf_counter()
    results_folder = target.parent if target.name == RESULTS else (
        target if (target / RESULTS).is_file() else None)
    if results_folder is not None:
        info = write_gallery(results_folder, up_axis=args.up_axis, location=args.output,
                             progress=not args.no_progress)
    else:
        location = args.output or Path.cwd() / f"{target.resolve().stem or 'meshes'}.html"
        info = write_mesh_page(target, location, up_axis=args.up_axis, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(f"wrote {info.path}: {info.panels} objects, {info.shapes} shapes, "
          f"{info.bytes / 1e6:.1f} MB, in {seconds:.1f} s")
    write_result(args, {"page": str(info.path), "objects": info.panels, "shapes": info.shapes,
                        "bytes": info.bytes, "seconds": round(seconds, 3)})
    if args.open:
        import webbrowser

        if not webbrowser.open(Path(info.path).absolute().as_uri()):
            print("no browser to open it with here: open the file above in one")
    return 0


def add_view_command(sub: argparse._SubParsersAction) -> None:
    from mar3d.cli.common import add_result_arg

    p = sub.add_parser("view", help="a page of rotatable 3D shapes for meshes or a generation's results",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="MESH_OR_RESULTS",
                   help="a mesh file, a folder of meshes, a results.parquet or a generation output folder")
    p.add_argument("-o", "--output", type=Path, default=None, metavar="HTML",
                   help="where to write the page (default: see above)")
    p.add_argument("--up-axis", choices=("y", "z"), default="y",
                   help="the shapes' up axis, for the initial view (glTF: y; YCB scans: z)")
    p.add_argument("--open", action="store_true", help="open the page in the default web browser")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_result_arg(p)
    p.set_defaults(func=_cmd_view)
