"""Image conditioner: tiny open_clip + timm encoders of the real classes, preprocessing, weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mar3d.config import ConfigError, load_config
from mar3d.models.condition import (CLIP_MEAN, CLIP_STD, ConditionConfig, ImageConditioner,
                                    composite_on_white, resize_center_crop)


@pytest.fixture(scope="module")
def conditioner() -> ImageConditioner:
    torch.manual_seed(0)
    return ImageConditioner(ConditionConfig(tiny=True, out_dim=32))


def rgba_batch(b: int = 2, h: int = 224, w: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 4), generator=g, dtype=torch.uint8)


def test_tiny_encoders_are_the_real_classes(conditioner):
    import open_clip.transformer
    import timm.models.vision_transformer

    assert isinstance(conditioner.clip, open_clip.transformer.VisionTransformer)
    assert isinstance(conditioner.dino, timm.models.vision_transformer.VisionTransformer)


def test_composite_on_white():
    img = torch.zeros(1, 2, 2, 4, dtype=torch.uint8)
    img[0, 0, 0] = torch.tensor([10, 20, 30, 0])      # fully transparent -> white
    img[0, 0, 1] = torch.tensor([255, 0, 0, 255])     # opaque red stays red
    img[0, 1, 0] = torch.tensor([0, 0, 0, 128])       # half-transparent black -> mid grey
    out = composite_on_white(img)
    assert out.shape == (1, 3, 2, 2)
    assert torch.equal(out[0, :, 0, 0], torch.ones(3))
    assert torch.equal(out[0, :, 0, 1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out[0, :, 1, 0], torch.full((3,), 1 - 128 / 255))
    with pytest.raises(ValueError, match="uint8"):
        composite_on_white(img.float())
    with pytest.raises(ValueError, match="RGBA"):
        composite_on_white(torch.zeros(1, 4, 4, 2, dtype=torch.uint8))


def test_resize_center_crop():
    x = torch.full((2, 3, 300, 400), 0.25)
    out = resize_center_crop(x, 224)
    assert out.shape == (2, 3, 224, 224)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-5)
    # A centred square survives the crop of a wide image in the middle.
    x = torch.zeros(1, 3, 224, 448)
    x[..., 112:336] = 1.0
    out = resize_center_crop(x, 112)
    assert out[..., 56, 56].min() > 0.99 and out[..., 56, 0].max() > 0.5


def test_preprocess_uses_each_encoders_normalisation(conditioner):
    transparent = torch.zeros(1, 64, 64, 4, dtype=torch.uint8)   # -> pure white
    clip_in, dino_in = conditioner.preprocess(transparent)
    assert clip_in.shape == dino_in.shape == (1, 3, 224, 224)
    clip_white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    dino_cfg = conditioner.dino.pretrained_cfg
    dino_white = (1 - torch.tensor(dino_cfg["mean"])) / torch.tensor(dino_cfg["std"])
    assert torch.allclose(clip_in[0, :, 100, 100], clip_white, atol=1e-5)
    assert torch.allclose(dino_in[0, :, 100, 100], dino_white, atol=1e-5)
    assert not torch.allclose(clip_white, dino_white)


def test_forward_shapes_and_token_layout(conditioner):
    out = conditioner(rgba_batch(3, 240, 200))
    # CLIP 224/32 -> 7x7 patches + CLS, DINOv2 224/28 -> 8x8 patches + CLS.
    assert conditioner.num_tokens == (1 + 49) + (1 + 64)
    assert out.shape == (3, conditioner.num_tokens, 32)
    assert torch.isfinite(out).all()
    torch.manual_seed(0)
    short = ImageConditioner(ConditionConfig(tiny=True, out_dim=32, clip_tokens="cls", dino_tokens="patch"))
    assert short.num_tokens == 1 + 64
    assert short(rgba_batch(2)).shape == (2, 65, 32)


def test_accepts_pil_lists_and_numpy(conditioner):
    batch = rgba_batch(2, 96, 96)
    pil = [Image.fromarray(img.numpy(), mode="RGBA") for img in batch]
    a = conditioner(batch)
    assert torch.allclose(conditioner(pil), a, atol=1e-5)
    assert torch.allclose(conditioner(batch.numpy()), a, atol=1e-5)
    assert torch.allclose(conditioner(batch[0]), a[:1], atol=1e-5)   # a single [H, W, 4] image
    rgb = [Image.fromarray(np.full((32, 32, 3), 200, np.uint8))]     # RGB PIL -> opaque RGBA
    assert conditioner(rgb).shape == (1, conditioner.num_tokens, 32)
    with pytest.raises(ValueError, match="share a shape"):
        conditioner([batch[0].numpy(), batch[0, :50].numpy()])


def test_encoders_frozen_projections_trainable(conditioner):
    conditioner.train()
    assert not conditioner.clip.training and not conditioner.dino.training
    assert all(not p.requires_grad for p in conditioner.clip.parameters())
    assert all(not p.requires_grad for p in conditioner.dino.parameters())
    conditioner.zero_grad()
    conditioner(rgba_batch(1)).square().mean().backward()
    assert conditioner.clip_proj.weight.grad is not None
    assert conditioner.dino_proj.weight.grad is not None
    conditioner.eval()


def test_missing_local_weights_give_a_clear_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*not an open_clip tag"):
        ImageConditioner(ConditionConfig(clip_model="ViT-S-32", clip_pretrained=str(missing)))
    with pytest.raises(FileNotFoundError, match="dino_pretrained.*nope.safetensors"):
        ImageConditioner(ConditionConfig(clip_model="ViT-S-32", dino_model="vit_small_patch14_dinov2",
                                         dino_pretrained=str(missing)))


def test_local_weights_load_into_the_real_architectures(tmp_path):
    """Checkpoints saved as safetensors load through the real-name path (no network)."""
    import open_clip
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-S-32")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, tmp_path / "clip.safetensors")
    dino = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)  # 518 px
    save_file({k: v.contiguous() for k, v in dino.state_dict().items()}, tmp_path / "dino.safetensors")
    cond = ImageConditioner(ConditionConfig(
        clip_model="ViT-S-32", clip_pretrained=str(tmp_path / "clip.safetensors"),
        dino_model="vit_small_patch14_dinov2", dino_pretrained=str(tmp_path / "dino.safetensors"),
        out_dim=16))
    assert torch.equal(cond.clip.conv1.weight, clip.visual.conv1.weight)
    assert torch.equal(cond.dino.blocks[0].attn.qkv.weight, dino.blocks[0].attn.qkv.weight)
    assert cond.dino.pos_embed.shape[1] == 1 + 16 * 16     # resampled from 518 px to 224 px
    assert cond(rgba_batch(1)).shape == (1, cond.num_tokens, 16)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ConditionConfig(tiny=True, tiny_width=30, tiny_heads=4).validate()
    with pytest.raises(ValueError, match="must divide"):
        ConditionConfig(tiny=True, tiny_clip_patch=30).validate()
    with pytest.raises(ValueError, match="clip_tokens"):
        ConditionConfig(clip_tokens="patch").validate()
    with pytest.raises(ConfigError):
        load_config(ConditionConfig, None, ["clip_tokens=patch"])
