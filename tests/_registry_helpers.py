"""Small fake releases (four tiny safetensors components logged as runs) for registry tests."""
from __future__ import annotations

import mlflow
import torch
from safetensors.torch import save_file

from mar3d.registry import RegistryConfig, record_metrics, register_release


def log_component(tmp_path, name: str, value: float) -> str:
    d = tmp_path / name
    d.mkdir(parents=True)
    save_file({"w": torch.full((4, 4), value)}, str(d / "model.safetensors"))
    (d / "config.yaml").write_text(f"kind: {name}\n")
    with mlflow.start_run(run_name=f"train-{name}") as run:
        mlflow.log_artifacts(str(d), "model")
    return f"runs:/{run.info.run_id}/model"


def make_release(tmp_path, tag: str, metrics: dict, cfg: RegistryConfig, tags: dict | None = None):
    """A release with evaluation ``metrics``; ``tags`` default to one evaluation protocol
    shared by every release made here (so the gate may compare them)."""
    uris = {c: log_component(tmp_path / tag, c, i) for i, c in enumerate(["vae", "cond", "lr", "hr"])}
    rel = register_release(uris, cfg=cfg)
    if tags is None:
        tags = {f"eval.{g}.protocol": "same-objects" for g in ("seen_view", "heldout_objects")}
    return record_metrics(rel, metrics, tags=tags)
