"""Pages of rotatable shapes (mar3d.viewer): display decimation, what a page carries and
that it decodes to the shapes given, the mesh pages of `mar3d view`, and one page
opened in a real browser (drawn, turned by a drag)."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import trimesh

from mar3d.viewer import (Panel, decimate, mesh_files, mesh_shape, page_html, points_shape, write_mesh_page,
                          write_page)


def _blocks(document: str) -> tuple[dict, dict[int, list[dict]]]:
    """The page's panel list and each panel's shape arrays, as the page's script reads them."""
    meta = json.loads(re.search(r'<script type="application/json" id="mar3d-data">(.*?)</script>',
                                document, re.S).group(1))
    shapes = {int(i): json.loads(body) for i, body in re.findall(
        r'<script type="application/json" id="mar3d-shapes-(\d+)">(.*?)</script>', document, re.S)}
    return meta, shapes


def _decode(block: dict) -> tuple[np.ndarray, np.ndarray | None]:
    q = np.frombuffer(base64.b64decode(block["vertices"]), "<u2").reshape(-1, 3)
    vertices = np.asarray(block["origin"]) + q * block["scale"]
    faces = None
    if block["faces"] is not None:
        faces = np.frombuffer(base64.b64decode(block["faces"]), "<u4" if block["wide"] else "<u2").reshape(-1, 3)
    return vertices, faces


def test_decimate_keeps_the_silhouette_under_the_face_budget():
    sphere = trimesh.creation.icosphere(5)  # 20480 faces
    vertices, faces = decimate(sphere.vertices, sphere.faces, 2000)
    assert 500 < len(faces) <= 2000 and faces.max() < len(vertices) and faces.min() >= 0
    assert vertices.dtype == np.float32 and faces.dtype == np.int32
    # Every face has 3 distinct vertices, no face twice, and the shape is still the sphere.
    assert (np.diff(np.sort(faces, 1), axis=1) > 0).all()
    assert len(np.unique(np.sort(faces, 1), axis=0)) == len(faces)
    radius = np.linalg.norm(vertices, axis=1)
    assert np.abs(radius - 1).max() < 0.05
    np.testing.assert_allclose(vertices.min(0), -1, atol=0.05)
    small = trimesh.creation.box()
    v, f = decimate(small.vertices, small.faces, 2000)  # under the budget: unchanged
    np.testing.assert_array_equal(f, small.faces)
    np.testing.assert_allclose(v, small.vertices)


def test_page_carries_its_shapes_exactly_enough_and_escapes_text():
    mesh = trimesh.creation.annulus(0.3, 0.8, 0.5)
    points = np.random.default_rng(0).normal(size=(5000, 6))
    hostile = "</script><script>alert(1)</script>"
    panels = [Panel("cup", "CD 0.1", np.zeros((8, 8, 4), np.uint8),
                    [mesh_shape(mesh, "generated", max_faces=10_000), points_shape(points, "truth", 1000)]),
              Panel(hostile, error=f"failed: {hostile}")]
    document = page_html(panels, title=hostile, subtitle="s")
    assert hostile not in document  # in the JSON as "<\/script>": it cannot end the script early
    assert "<title>&lt;/script&gt;" in document
    meta, shapes = _blocks(document)
    assert [p["title"] for p in meta["panels"]] == ["cup", hostile]
    assert meta["panels"][1]["error"] == f"failed: {hostile}" and 1 not in shapes
    assert meta["panels"][0]["image"].startswith("data:image/png;base64,")
    assert [s["label"] for s in meta["panels"][0]["shapes"]] == ["generated", "truth"]
    (v, f), (p, none) = (_decode(b) for b in shapes[0])
    np.testing.assert_array_equal(f, mesh.faces)
    # 16-bit quantization over the bounding box: well under a pixel of any view.
    assert np.abs(v - mesh.vertices).max() <= np.ptp(mesh.vertices, 0).max() / 65535
    assert none is None and len(p) == 1000 and meta["panels"][0]["shapes"][1]["source_count"] == 5000
    np.testing.assert_allclose(p, points[::5, :3], atol=np.ptp(points[:, :3], 0).max() / 65535)
    with pytest.raises(ValueError, match="up_axis"):
        page_html(panels, "t", up_axis="x")


def test_mesh_page_lists_files_it_cannot_show(tmp_path):
    (tmp_path / "sub").mkdir()
    trimesh.creation.icosphere(4).export(tmp_path / "sub" / "ball.glb")
    trimesh.creation.box().export(tmp_path / "box.obj")
    (tmp_path / "broken.ply").write_bytes(b"ply\nnot really\n")
    (tmp_path / "notes.txt").write_text("not a mesh")
    assert [p.name for p in mesh_files(tmp_path)] == ["box.obj", "broken.ply", "ball.glb"]
    info = write_mesh_page(tmp_path, tmp_path / "page.html")
    assert (info.panels, info.shapes) == (3, 2) and info.bytes == (tmp_path / "page.html").stat().st_size
    meta, shapes = _blocks((tmp_path / "page.html").read_text())
    by_title = {p["title"]: p for p in meta["panels"]}
    assert by_title["broken.ply"]["error"].startswith("not shown:") and not by_title["broken.ply"]["shapes"]
    ball = by_title["sub/ball.glb"]["shapes"][0]
    assert ball["count"] <= 3000 < ball["source_count"] == 5120
    with pytest.raises(ValueError, match="not a mesh file"):
        mesh_files(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no mesh files"):
        mesh_files(tmp_path / "empty")


def test_view_command_writes_a_page(tmp_path, capsys):
    from mar3d.cli import main

    trimesh.creation.icosphere(3).export(tmp_path / "ball.glb")
    assert main(["view", str(tmp_path / "ball.glb"), "-o", str(tmp_path / "ball.html"),
                 "--result-json", str(tmp_path / "r.json"), "--no-progress"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["objects"] == 1 and result["bytes"] == (tmp_path / "ball.html").stat().st_size
    assert "1 objects, 1 shapes" in capsys.readouterr().out
    assert main(["view", str(tmp_path / "missing.glb")]) == 2


@pytest.mark.e2e
def test_page_draws_and_turns_in_a_real_browser(tmp_path):
    """Headless Chromium opens a page of two panels (mesh + points, turning together):
    the views draw the shapes and a drag turns them; paging shows the next panels."""
    from _browser import check_view_turns, chromium_page, page_frame

    panels = [Panel(f"object {i}", shapes=[mesh_shape(trimesh.creation.capsule(1.0, 0.5), "generated"),
                                           points_shape(trimesh.creation.icosphere(3).vertices, "truth")])
              for i in range(3)]
    write_page(panels, tmp_path / "page.html", "three capsules", up_axis="y", page_size=2)
    with chromium_page() as page:
        page.goto((tmp_path / "page.html").as_uri())
        frame = page_frame(page)
        measured = check_view_turns(page, frame)
        assert measured["views_in_panel"] == 2
        assert "page 1 of 2" in page.text_content("#pageinfo")
        page.click("#next")
        page.wait_for_function("() => document.querySelectorAll('.panel').length === 1")
        assert page.text_content(".panel h2") == "object 2"
