"""Write a release folder (vae/, cond/, lr/, hr/ safetensors model folders) of randomly
initialised preset models: ``tiny`` for the tests, ``paper`` for GPU timings
(benchmarks/gpu_figures.py).

The weights are randomly initialised (no training): enough to exercise loading,
sampling, decoding and the batch/error paths, and to time them (the cost does not
depend on the weights), not to judge quality.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mar3d.config import load_config, to_dict
from mar3d.inference import save_conditioner
from mar3d.models.condition import ConditionConfig, ImageEncoder
from mar3d.models.mar import ConditionalMAR, MARConfig
from mar3d.models.vae import ShapeVAE, VAEConfig
from mar3d.weights import save_model_dir


def write_random_release(root: Path, size: str, seed: int = 0, lr_overrides: tuple[str, ...] = ()) -> Path:
    """The ``vae_{size}`` VAE, the ``mar_{size}`` image encoder (once, ``cond/``) and the
    ``mar_{size}`` MAR-LR/HR presets (``lr_overrides``: ``key=value`` for MAR-LR's config)."""
    torch.manual_seed(seed)
    vae_cfg = load_config(VAEConfig, f"vae_{size}")
    cond_cfg = load_config(ConditionConfig, f"mar_{size}", section="condition")
    save_model_dir(root / "vae", ShapeVAE(vae_cfg).state_dict(), to_dict(vae_cfg), kind="vae")
    encoder = ImageEncoder(cond_cfg)
    conditioner_id = save_conditioner(encoder, root / "cond")
    for stage in ("lr", "hr"):
        mar_cfg = load_config(MARConfig, f"mar_{size}", lr_overrides if stage == "lr" else (), section=stage)
        model = ConditionalMAR(cond_cfg, mar_cfg, encoder.spec)
        save_model_dir(root / stage, model.state_dict(),
                       {"mar": to_dict(mar_cfg), "condition": to_dict(cond_cfg),
                        "encoder": dataclasses.asdict(encoder.spec)},
                       kind=stage, extra={"conditioner_id": conditioner_id,
                                          "condition_model_uri": str((root / "cond").resolve())})
    return root


def write_tiny_release(root: Path, seed: int = 0, lr_overrides: tuple[str, ...] = ()) -> Path:
    return write_random_release(root, "tiny", seed, lr_overrides)
