"""Image conditioner: tiny open_clip + timm encoders of the real classes (the frozen, shared
ImageEncoder), preprocessing, weights, and a stage's trainable ConditionProjection."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mar3d.config import ConfigError, load_config
from mar3d.models.condition import (CLIP_MEAN, CLIP_STD, ConditionConfig, ConditionProjection,
                                    ImageEncoder, composite_on_white, resize_center_crop)
from mar3d.weights import content_id

TINY = ConditionConfig(tiny=True, out_dim=32)


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    return ImageEncoder(TINY)


@pytest.fixture(scope="module")
def conditioner(encoder):
    """Encoder + a stage's projection: images -> condition tokens."""
    torch.manual_seed(0)
    projection = ConditionProjection(TINY, encoder.spec)
    return lambda images: projection(encoder(images))


def rgba_batch(b: int = 2, h: int = 224, w: int = 224, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 4), generator=g, dtype=torch.uint8)


def test_tiny_encoders_are_the_real_classes(encoder):
    import open_clip.transformer
    import timm.models.vision_transformer

    assert isinstance(encoder.clip, open_clip.transformer.VisionTransformer)
    assert isinstance(encoder.dino, timm.models.vision_transformer.VisionTransformer)


def test_random_encoder_weights_come_from_init_seed_alone():
    """Two stages that build the encoder from one config get the same weights (and id),
    whatever ran before; another init_seed gives other weights."""
    torch.manual_seed(1)
    a = ImageEncoder(TINY)
    torch.manual_seed(2)
    torch.rand(100)
    b = ImageEncoder(TINY)
    c = ImageEncoder(ConditionConfig(tiny=True, out_dim=32, init_seed=1))
    assert content_id(a.state_dict()) == content_id(b.state_dict()) != content_id(c.state_dict())
    assert not any(p.requires_grad for p in a.parameters())


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


def test_preprocess_uses_each_encoders_normalisation(encoder):
    transparent = torch.zeros(1, 64, 64, 4, dtype=torch.uint8)   # -> pure white
    clip_in, dino_in = encoder.preprocess(transparent)
    assert clip_in.shape == dino_in.shape == (1, 3, 224, 224)
    clip_white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    dino_cfg = encoder.dino.pretrained_cfg
    dino_white = (1 - torch.tensor(dino_cfg["mean"])) / torch.tensor(dino_cfg["std"])
    assert torch.allclose(clip_in[0, :, 100, 100], clip_white, atol=1e-5)
    assert torch.allclose(dino_in[0, :, 100, 100], dino_white, atol=1e-5)
    assert not torch.allclose(clip_white, dino_white)


def test_forward_shapes_and_token_layout(encoder, conditioner):
    features = encoder(rgba_batch(3, 240, 200))
    # The encoder gives every token: CLIP 224/32 -> CLS + 7x7, DINOv2 224/28 -> CLS + 8x8.
    assert features["clip"].shape == (3, 1 + 49, 64) and features["dino"].shape == (3, 1 + 64, 64)
    full = ConditionProjection(TINY, encoder.spec)
    assert full.num_tokens == (1 + 49) + (1 + 64)
    out = conditioner(rgba_batch(3, 240, 200))
    assert out.shape == (3, full.num_tokens, 32)
    assert torch.isfinite(out).all()
    short = ConditionProjection(ConditionConfig(tiny=True, out_dim=32, clip_tokens="cls", dino_tokens="patch"),
                                encoder.spec)
    assert short.num_tokens == 1 + 64
    out = short(features)
    assert out.shape == (3, 65, 32)
    # CLS of CLIP first, then DINOv2's patches without its CLS.
    assert torch.allclose(out[:, :1], short.clip_proj(features["clip"][:, :1]))
    assert torch.allclose(out[:, 1:], short.dino_proj(features["dino"][:, 1:]))


def test_projection_refuses_features_of_another_encoder(encoder):
    projection = ConditionProjection(TINY, encoder.spec)
    features = encoder(rgba_batch(1))
    with pytest.raises(ValueError, match="clip features must be"):
        projection({**features, "clip": features["clip"][:, :10]})


def test_accepts_pil_lists_and_numpy(conditioner):
    batch = rgba_batch(2, 96, 96)
    pil = [Image.fromarray(img.numpy(), mode="RGBA") for img in batch]
    a = conditioner(batch)
    assert torch.allclose(conditioner(pil), a, atol=1e-5)
    assert torch.allclose(conditioner(batch.numpy()), a, atol=1e-5)
    assert torch.allclose(conditioner(batch[0]), a[:1], atol=1e-5)   # a single [H, W, 4] image
    rgb = [Image.fromarray(np.full((32, 32, 3), 200, np.uint8))]     # RGB PIL -> opaque RGBA
    assert conditioner(rgb).shape == (1, (1 + 49) + (1 + 64), 32)
    with pytest.raises(ValueError, match="share a shape"):
        conditioner([batch[0].numpy(), batch[0, :50].numpy()])


def test_encode_takes_images_of_different_sizes_one_at_a_time(encoder):
    a, b = rgba_batch(1, 96, 96)[0].numpy(), rgba_batch(1, 64, 80, seed=1)[0].numpy()
    mixed = encoder.encode([a, b])
    for key in ("clip", "dino"):
        assert torch.allclose(mixed[key][:1], encoder([a])[key], atol=1e-6)
        assert torch.allclose(mixed[key][1:], encoder([b])[key], atol=1e-6)


def test_encoders_frozen_projections_trainable(encoder):
    encoder.train()
    assert not encoder.training and not encoder.clip.training and not encoder.dino.training
    assert all(not p.requires_grad for p in encoder.parameters())
    features = encoder(rgba_batch(1))
    assert not features["clip"].requires_grad
    projection = ConditionProjection(TINY, encoder.spec)
    projection(features).square().mean().backward()
    assert projection.clip_proj.weight.grad is not None
    assert projection.dino_proj.weight.grad is not None


def test_missing_local_weights_give_a_clear_error(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors.*not an open_clip tag"):
        ImageEncoder(ConditionConfig(clip_model="ViT-S-32", clip_pretrained=str(missing)))
    with pytest.raises(FileNotFoundError, match="dino_pretrained.*nope.safetensors"):
        ImageEncoder(ConditionConfig(clip_model="ViT-S-32", dino_model="vit_small_patch14_dinov2",
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
    cfg = ConditionConfig(
        clip_model="ViT-S-32", clip_pretrained=str(tmp_path / "clip.safetensors"),
        dino_model="vit_small_patch14_dinov2", dino_pretrained=str(tmp_path / "dino.safetensors"),
        out_dim=16)
    cond = ImageEncoder(cfg)
    assert torch.equal(cond.clip.conv1.weight, clip.visual.conv1.weight)
    assert torch.equal(cond.dino.blocks[0].attn.qkv.weight, dino.blocks[0].attn.qkv.weight)
    assert cond.dino.pos_embed.shape[1] == 1 + 16 * 16     # resampled from 518 px to 224 px
    projection = ConditionProjection(cfg, cond.spec)
    assert projection(cond(rgba_batch(1))).shape == (1, projection.num_tokens, 16)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        ConditionConfig(tiny=True, tiny_width=30, tiny_heads=4).validate()
    with pytest.raises(ValueError, match="must divide"):
        ConditionConfig(tiny=True, tiny_clip_patch=30).validate()
    with pytest.raises(ValueError, match="clip_tokens"):
        ConditionConfig(clip_tokens="patch").validate()
    with pytest.raises(ConfigError):
        load_config(ConditionConfig, None, ["clip_tokens=patch"])
