"""One image conditioner per release: the frozen encoder is stored once (``cond/``), MAR-LR
and MAR-HR hold only their projections, and inference encodes each image once."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from _tiny_release import write_tiny_release
from mar3d.config import load_config
from mar3d.inference import PipelineConfig, MAR3DPipeline, load_conditioner, load_frozen_conditioner
from mar3d.models.mar import SamplingConfig
from mar3d.models.condition import ConditionConfig, ImageEncoder
from mar3d.models.mar import ConditionalMAR, MARConfig
from mar3d.registry import RegistryError, trained_conditioner
from mar3d.weights import WEIGHTS_FILE

# Tensors of the image encoder inside a MAR model: none since the encoder is its own folder.
ENCODER_PREFIXES = ("conditioner.clip.", "conditioner.dino.")
FAST = PipelineConfig(sampling=SamplingConfig(num_inference_steps=4, diffusion_steps=5), resolution=32)


def encoder_keys(folder: Path) -> list[str]:
    return [k for k in load_file(str(folder / WEIGHTS_FILE)) if k.startswith(ENCODER_PREFIXES)]


def megabytes(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2 ** 20


def test_paper_stage_weights_no_longer_carry_the_encoders():
    """Byte accounting of the paper configuration on the meta device (nothing allocated):
    the ~607 M-parameter CLIP ViT-L/14 + DINOv2-L towers are the conditioner's alone."""
    cond = load_config(ConditionConfig, "mar_paper", section="condition")
    with torch.device("meta"):
        encoder = ImageEncoder(cond)
        stages = {s: ConditionalMAR(cond, load_config(MARConfig, "mar_paper", section=s), encoder.spec)
                  for s in ("lr", "hr")}
    encoder_params = sum(p.numel() for p in encoder.parameters())
    assert 600e6 < encoder_params < 615e6
    rows = []
    for name, model in stages.items():
        assert not [k for k in model.state_dict() if k.startswith(ENCODER_PREFIXES)]
        assert all(p.requires_grad for p in model.parameters())  # what DeepSpeed checkpoints
        before, after = megabytes(encoder) + megabytes(model), megabytes(model)
        rows.append(f"| MAR-{name.upper()} | {before:,.0f} MB | {after:,.0f} MB | {before / after:.2f}x |")
        assert before / after > 1.5
    print("\n| stage weights (fp32) | before | after | ratio |\n|---|---|---|---|\n" + "\n".join(rows)
          + f"\n| conditioner (once per release) | | {megabytes(encoder):,.0f} MB | |")


def test_tiny_release_stores_the_encoder_once_and_encodes_each_image_once(tmp_path):
    release = write_tiny_release(tmp_path / "release")
    assert not encoder_keys(release / "lr") and not encoder_keys(release / "hr")
    stored = load_file(str(release / "cond" / WEIGHTS_FILE))
    assert stored and all(k.startswith(("clip.", "dino.")) for k in stored)
    pipe = MAR3DPipeline.from_pretrained(str(release), config=FAST, device="cpu")
    calls = []
    pipe.encoder.register_forward_hook(lambda *args: calls.append(1))
    images = [np.full((64, 64, 4), 255, np.uint8), np.zeros((64, 64, 4), np.uint8)]
    out = pipe(images, seed=0, output_type="latent")
    assert out.level == "hr" and out.latents.shape[0] == 2
    assert len(calls) == 1  # one batch, one encoder pass, both stages fed from it


def test_a_release_mixing_conditioners_is_refused(tmp_path):
    release = write_tiny_release(tmp_path / "release")
    other = write_tiny_release(tmp_path / "other")  # same seed: the same encoder
    cond = load_config(ConditionConfig, "mar_tiny", section="condition")
    from mar3d.inference import save_conditioner

    shutil.rmtree(other / "cond")
    save_conditioner(ImageEncoder(dataclasses.replace(cond, init_seed=7)), other / "cond")
    shutil.rmtree(release / "cond")
    shutil.copytree(other / "cond", release / "cond")
    with pytest.raises(ValueError, match="different conditioners"):
        MAR3DPipeline.from_pretrained(str(release), config=FAST, device="cpu")
    shutil.rmtree(release / "cond")
    with pytest.raises(ValueError, match=r"no conditioner \(cond/\)"):
        MAR3DPipeline.from_pretrained(str(release), config=FAST, device="cpu")


def test_damaged_conditioner_folder_is_refused(tmp_path):
    release = write_tiny_release(tmp_path / "release")
    path = release / "cond" / WEIGHTS_FILE
    state = load_file(str(path))
    name = sorted(state)[0]
    state[name] = state[name] + 1
    save_file(state, str(path), metadata={"format": "mar3d-weights/v1", "kind": "cond"})
    with pytest.raises(ValueError, match="damaged or was edited"):
        load_conditioner(release / "cond")


def test_a_stage_refuses_a_conditioner_its_config_does_not_describe(tmp_path):
    release = write_tiny_release(tmp_path / "release")
    cond = load_config(ConditionConfig, "mar_tiny", section="condition")
    encoder, _ = load_frozen_conditioner(str(release / "cond"), cond, None)
    assert encoder.spec.clip_width == cond.tiny_width
    with pytest.raises(ValueError, match="tiny_width: 32 != 64"):
        load_frozen_conditioner(str(release / "cond"), dataclasses.replace(cond, tiny_width=32), None)


def test_release_registration_takes_the_conditioner_the_stages_were_trained_with():
    docs = {"runs:/a/model": {"extra": {"conditioner_id": "x", "condition_model_uri": "runs:/a/conditioner"}},
            "runs:/b/model": {"extra": {"conditioner_id": "x", "condition_model_uri": "runs:/b/conditioner"}},
            "runs:/c/model": {"extra": {"conditioner_id": "y", "condition_model_uri": "runs:/c/conditioner"}},
            "runs:/old/model": {"extra": {"global_step": 3}}}
    read = docs.__getitem__
    assert trained_conditioner({"lr": "runs:/a/model", "hr": "runs:/b/model"}, read) == "runs:/a/conditioner"
    with pytest.raises(RegistryError, match="MAR-HR runs:/old/model records no conditioner_id"):
        trained_conditioner({"lr": "runs:/a/model", "hr": "runs:/old/model"}, read)
    with pytest.raises(RegistryError, match="different image encoders"):
        trained_conditioner({"lr": "runs:/a/model", "hr": "runs:/c/model"}, read)


def test_training_refuses_to_fine_tune_pretrained_encoders():
    # Only the tiny random towers train (with MAR-LR); the paper's pretrained ones stay frozen.
    from mar3d.train import load_train_config

    with pytest.raises(ValueError, match="pretrained CLIP \\+ DINOv2 stay frozen"):
        load_train_config("lr", "train_lr_tiny", ["vae_model_uri=/some/vae", "condition.train_encoders=true",
                                                  "condition.tiny=false"])
