"""Score what the session's trained cascade generates (tests/test_cascade_e2e.py): the
ground truth of its shards, the Chamfer matrix of generated shapes against every object's
ground truth, and the frozen VAE's own reconstructions as the reference. Everything goes
through the production code: ``MAR3DPipeline`` and ``mar3d.metrics.mesh_metrics``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class GroundTruth:
    uid: str
    points: np.ndarray     # surface_0 xyz [N, 3] in the normalized frame
    normals: np.ndarray    # [N, 3]
    views: np.ndarray      # RGBA condition renders [V, H, W, 4]


def load_ground_truth(shards: Path) -> list[GroundTruth]:
    """Every stored shape of ``shards`` (finest surface level + renders), sorted by uid."""
    from mar3d.data.dataset import ShapeDataset

    dataset = ShapeDataset(shards, num_occ=16, seed=0)
    out = []
    for i in range(len(dataset)):
        row = dataset.read_row(i)
        surface = np.asarray(row["surface_0"], np.float64)
        out.append(GroundTruth(row["uid"], surface[:, :3], surface[:, 3:], np.asarray(row["images"])))
    return sorted(out, key=lambda g: g.uid)


@dataclass
class CascadeScores:
    uids: list[str]
    chamfer: np.ndarray         # [i, j]: shape generated from object i's view vs GT of j
    sample_seconds: float
    decode_seconds: float

    @property
    def own(self) -> np.ndarray:
        return np.diag(self.chamfer)

    @property
    def others(self) -> np.ndarray:
        """Per generated shape, the mean Chamfer distance to the *other* objects' GT."""
        n = len(self.uids)
        off = ~np.eye(n, dtype=bool)
        return np.array([self.chamfer[i][off[i]].mean() for i in range(n)])

    def rows_won(self) -> int:
        """Rows where the generated shape is closest to its own object's GT."""
        return int(sum(np.argmin(self.chamfer[i]) == i for i in range(len(self.uids))))

    def table(self, title: str) -> str:
        width = max(len(u) for u in self.uids)
        lines = [title, " " * (width + 4) + " ".join(f"{u[:12]:>12}" for u in self.uids)]
        for i, uid in enumerate(self.uids):
            cells = " ".join(("*" if i == j else " ") + f"{self.chamfer[i, j]:11.4f}"
                             for j in range(len(self.uids)))
            lines.append(f"gen {uid:<{width}} {cells}")
        lines.append(f"mean own {self.own.mean():.4f}  mean others {self.others.mean():.4f}  "
                     f"rows won {self.rows_won()}/{len(self.uids)}  "
                     f"(sampling {self.sample_seconds:.1f} s, decoding {self.decode_seconds:.1f} s)")
        return "\n".join(lines)


def chamfer_matrix(pipe, truths: list[GroundTruth], view: int = 0, seed: int = 0,
                   use_hr: bool = True, resolution: int = 64, num_points: int = 10_000,
                   **sampling) -> CascadeScores:
    """Generate one shape per object from its ``view`` and score it against every GT.

    A generation with no surface scores CD = inf against everything (``mesh_metrics``'s
    convention), which the caller reports as a failure rather than a win."""
    from mar3d.metrics import mesh_metrics

    n = len(truths)
    cd = np.full((n, n), math.inf)
    sample_s = decode_s = 0.0
    for i, gen_from in enumerate(truths):
        out = pipe(gen_from.views[view], seed=seed, use_hr=use_hr, resolution=resolution, **sampling)
        sample_s += out.sample_seconds
        decode_s += out.decode_seconds[0]
        for j, gt in enumerate(truths):
            cd[i, j] = mesh_metrics(out.meshes[0], (gt.points, gt.normals), num_points=num_points)["chamfer"]
    return CascadeScores([t.uid for t in truths], cd, sample_s, decode_s)


def reconstruction_matrix(pipe, shards: Path, truths: list[GroundTruth], surface_sizes, level: str,
                          resolution: int = 64, num_points: int = 10_000) -> np.ndarray:
    """Reference for the generated shapes: the frozen VAE's own reconstruction of each
    object (posterior-mean ``level`` latents of its surface pyramid, decoded by ``pipe``)
    scored against every GT -- roughly the best a generator on this VAE can reach."""
    import torch

    from mar3d.data.dataset import ShapeDataset
    from mar3d.metrics import mesh_metrics

    dataset = ShapeDataset(shards, surface_sizes=tuple(surface_sizes), num_occ=16, seed=0)
    by_uid = {dataset.read_row(i)["uid"]: i for i in range(len(dataset))}
    cd = np.full((len(truths), len(truths)), math.inf)
    for i, truth in enumerate(truths):
        sample = dataset[by_uid[truth.uid]]
        surfaces = [sample[f"surface_{k}"][None] for k in range(len(surface_sizes))]
        with torch.no_grad():
            tokens = pipe.vae.encode(surfaces, level, sample=False)
        mesh = pipe.decode(tokens, resolution).mesh  # same extraction as generation
        for j, gt in enumerate(truths):
            cd[i, j] = mesh_metrics(mesh, (gt.points, gt.normals), num_points=num_points)["chamfer"]
    return cd
