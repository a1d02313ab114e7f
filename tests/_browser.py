"""A real browser for the pages tests: Debian's Chromium (``infra/install.sh`` installs it)
driven by Playwright, headless, WebGL on SwiftShader (no GPU needed)."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = os.environ.get("MAR3D_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless without a GPU: WebGL through SwiftShader; no background connections (the
# machine's network is closed, and they would only slow the start).
CHROMIUM_ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run"]
# Where tests leave their screenshots when asked (the README's pictures come from there).
SCREENSHOTS = os.environ.get("MAR3D_SCREENSHOTS")


@contextlib.contextmanager
def chromium_page(http_credentials: dict | None = None, viewport=(1280, 900)):
    """A page of a fresh headless Chromium; page errors fail the test at the end."""
    if not Path(CHROMIUM).is_file():
        message = f"Chromium not found at {CHROMIUM} (infra/install.sh installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]},
                                          http_credentials=http_credentials)
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page
        finally:
            browser.close()
    assert not errors, errors


def page_frame(page, timeout_s: float = 120.0):
    """The frame that holds a mar3d page: the page itself, or the iframe the MLflow UI
    shows an HTML artifact in (sandboxed: an opaque origin, so each frame is asked on its
    own). Waits until its first view is drawn."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for frame in page.frames:
            try:
                if frame.evaluate("() => !!(window.mar3dDrawn && window.mar3dDrawn.length)"):
                    return frame
            except Exception:  # noqa: BLE001 - a frame navigating or gone: ask again
                pass
        page.wait_for_timeout(250)
    raise AssertionError(f"no frame drew a view within {timeout_s:.0f} s: "
                         f"{[f.url[:80] for f in page.frames]}")


def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _changed(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.abs(a - b).sum(-1) > 30).mean())


def check_view_turns(page, frame, screenshot_name: str | None = None) -> dict:
    """The frame's first drawn view shows a shape (pixels differ from its background),
    a mouse drag turns it (camera and pixels change) and the other views of its panel
    turn with it (same camera). Returns what was measured."""
    view = frame.locator(".mar3d-view[data-state=drawn]").first
    view.scroll_into_view_if_needed()
    before = _pixels(view.screenshot())
    background = np.array([250, 250, 250])  # the views' paper colour (#fafafa)
    drawn = float((np.abs(before - background).sum(-1) > 30).mean())
    assert drawn > 0.01, f"the view drew nothing: {drawn:.4f} of its pixels differ from the background"
    camera = "v => JSON.stringify(v._fullLayout.scene.camera)"
    camera_before = view.evaluate(camera)
    box = view.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    # A drag that stays inside the view (views shrink in narrow frames such as MLflow's).
    page.mouse.move(x + box["width"] * 0.3, y + box["height"] * 0.1, steps=10)
    page.mouse.up()
    # The same element throughout (another view may finish drawing meanwhile).
    frame.wait_for_function("([v, before]) => JSON.stringify(v._fullLayout.scene.camera) !== before",
                            arg=[view.element_handle(), camera_before], timeout=30_000)
    page.wait_for_timeout(500)
    after = _pixels(view.screenshot())
    turned = _changed(before, after)
    assert turned > 0.01, f"dragging did not change the view: {turned:.4f} of its pixels changed"
    cameras = view.evaluate(
        "v => Array.from(v.closest('.panel').querySelectorAll('.mar3d-view[data-state=drawn]'),"
        " w => JSON.stringify(w._fullLayout.scene.camera.eye))")
    assert len(set(cameras)) == 1, f"the panel's views did not turn together: {cameras}"
    if SCREENSHOTS and screenshot_name:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / screenshot_name))
    return {"drawn": drawn, "turned": turned, "views_in_panel": len(cameras)}
