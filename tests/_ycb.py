"""Where the real YCB meshes are (beside the repository, or $MAR3D_YCB)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
YCB = Path(os.environ.get("MAR3D_YCB", REPO.parent / "shared" / "datasets" / "ycb"))

# A handful of small, varied real objects keeps unit tests fast.
YCB_SMALL = ["013_apple", "025_mug", "037_scissors", "077_rubiks_cube"]


def ycb_mesh(name: str) -> Path:
    path = YCB / name / "textured.obj"
    if not path.is_file():
        pytest.skip(f"YCB dataset not found at {YCB} (set MAR3D_YCB)")
    return path
