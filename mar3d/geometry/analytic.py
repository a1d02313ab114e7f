"""Analytic signed distance functions (negative inside) for tests and benchmarks.

``sdf_occupancy_fn`` turns one into an occupancy-logit function with the decoder's
convention (logit > 0 inside), so extraction can be checked against exact geometry.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SDF = Callable[[np.ndarray], np.ndarray]


def sphere_sdf(radius: float = 0.8, center=(0.0, 0.0, 0.0)) -> SDF:
    c = np.asarray(center, dtype=np.float64)
    return lambda p: np.linalg.norm(np.asarray(p, np.float64) - c, axis=-1) - radius


def torus_sdf(major: float = 0.6, minor: float = 0.2) -> SDF:
    """Torus around the z axis."""
    def sdf(p):
        p = np.asarray(p, np.float64)
        q = np.stack([np.linalg.norm(p[:, :2], axis=-1) - major, p[:, 2]], axis=-1)
        return np.linalg.norm(q, axis=-1) - minor
    return sdf


def box_sdf(half_extents=(0.8, 0.8, 0.04)) -> SDF:
    """Axis-aligned box; the default is a thin plate (thickness 0.08)."""
    b = np.asarray(half_extents, dtype=np.float64)

    def sdf(p):
        q = np.abs(np.asarray(p, np.float64)) - b
        outside = np.linalg.norm(np.maximum(q, 0.0), axis=-1)
        inside = np.minimum(q.max(axis=-1), 0.0)
        return outside + inside
    return sdf


def sdf_occupancy_fn(sdf: SDF, sharpness: float = 100.0) -> Callable[[np.ndarray], np.ndarray]:
    """Occupancy logits ``-sharpness * sdf`` (positive inside), like a trained decoder's."""
    return lambda p: (-sharpness * sdf(p)).astype(np.float32)


def winding_number_occupancy_fn(vertices: np.ndarray, faces: np.ndarray,
                                sharpness: float = 10.0) -> Callable[[np.ndarray], np.ndarray]:
    """Occupancy logits of a (possibly non-watertight) mesh from libigl's fast generalized
    winding number: ``sharpness * (w - 0.5)``, so the iso-level 0 is w = 1/2."""
    import igl

    v = np.ascontiguousarray(vertices, dtype=np.float64)
    f = np.ascontiguousarray(faces, dtype=np.int64)
    return lambda p: (sharpness * (igl.fast_winding_number(v, f, np.ascontiguousarray(p, np.float64)) - 0.5)
                      ).astype(np.float32)
