"""Train the whole tiny cascade (VAE -> MAR-LR, MAR-HR) and score what it generates.

Trained once per test session (``trained_cascade`` in tests/conftest.py) and read by
``tests/test_cascade_e2e.py`` (does the generated shape follow its image?) and
``tests/test_train_e2e.py`` (what the MAR-LR/HR trainings logged and saved). Everything runs through the production code:
``run_training`` (Ray Train + DeepSpeed, MLflow), the trained ``model/`` folders
assembled into a release folder, ``MAR3DPipeline.from_pretrained`` and
``mar3d.metrics.mesh_metrics``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


# The tiny encoders at 64 px keep the CPU training fast; the pipeline resizes the
# shards' condition renders (96 px, the smoke data preset) to that size.
SMALL_CONDITION = ("condition.image_size=64", "condition.tiny_clip_patch=16",
                   "condition.tiny_dino_patch=16")


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


CASCADE_STEPS = {"vae": 300, "lr": 300, "hr": 300}
CASCADE_LOG_EVERY = 50


def train_cascade(shards: Path, storage: Path, mlflow_uri: str, steps: dict[str, int],
                  experiment: str = "test-cascade", overrides: dict[str, list[str]] | None = None,
                  vae=None) -> tuple[dict, dict]:
    """Train vae, then lr and hr on the frozen VAE; returns (stage -> TrainConfig,
    stage -> TrainResult); the VAE's config is None when ``vae`` is given.

    ``vae``: the TrainResult of a VAE already trained on ``shards`` (the session's
    ``trained_vae``), built on instead of training one."""
    from mar3d.train import load_train_config, run_training

    overrides = overrides or {}
    results = {"vae": vae} if vae is not None else {}
    configs = {"vae": None} if vae is not None else {}
    for stage in ("vae", "lr", "hr"):
        if stage in results:
            continue
        n = steps[stage]
        common = [f"data={shards}", f"storage_path={storage}", f"mlflow_uri={mlflow_uri}",
                  f"run_name={stage}-cascade", f"experiment={experiment}", f"steps={n}",
                  f"warmup_steps={min(20, n // 10)}", f"checkpoint_every={n}",
                  # One evaluation, after the last step: it does not change the weights.
                  f"eval_every={n}", "num_eval_samples=4", "max_failures=0",
                  f"log_every={CASCADE_LOG_EVERY}", "batch_size=2",
                  # A conditioning test on 4 objects: train on every object and view (the
                  # held-out split is what the pipeline's evaluation tests).
                  "split=all"]
        if stage != "vae":
            common += [f"vae_model_uri={results['vae'].model_uri}", *SMALL_CONDITION]
        if stage == "hr":  # one image encoder per release: HR trains on LR's
            common.append(f"condition_model_uri={results['lr'].condition_model_uri}")
        configs[stage] = load_train_config(stage, f"train_{stage}_tiny",
                                           common + list(overrides.get(stage, ())))
        results[stage] = run_training(configs[stage])
    return configs, results


def assemble_release(results: dict, folder: Path) -> Path:
    """A release folder (vae/, cond/, lr/, hr/) of the models *as logged to MLflow*: each
    component is downloaded from its run's ``runs:/<id>/model`` URI (the image encoder
    from LR's ``condition_model_uri``), so the test covers what a registry release would
    serve, not just the trainer's local copy."""
    from mar3d.registry import resolve_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    uris = {stage: result.model_uri for stage, result in results.items()}
    uris["cond"] = results["lr"].condition_model_uri
    for component, uri in uris.items():
        downloaded = resolve_model_dir(uri, results["lr"].tracking_uri, dst=folder / "_mlflow" / component)
        downloaded.rename(folder / component)
    return folder


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
