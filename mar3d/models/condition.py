"""Image condition of MAR-3D: CLIP and DINOv2 tokens of one RGBA view.

CLIP (open_clip ``VisionTransformer``) contributes semantics, DINOv2 (timm
``VisionTransformer``) dense geometry-aware patch features. Each encoder's final-layer
tokens (after its final LayerNorm) are mapped by its own Linear to a common width and the
two sequences are **concatenated along the token axis**: ``[CLIP tokens; DINOv2 tokens]``.
Which tokens each contributes is configurable:

* ``clip_tokens``: ``"all"`` (CLS + patches, default) or ``"cls"``;
* ``dino_tokens``: ``"all"`` (CLS + patches, default) or ``"patch"``.

``clip_tokens="cls", dino_tokens="patch"`` reproduces the authors' 1 + 256 = 257-token
prefix for ViT-L/14 + DINOv2-L/14 at 224 px (see the ``mar_paper`` preset).

The encoders are frozen (eval mode, no gradients) unless ``train_encoders``; the two
projections are trainable and belong to whichever model owns the conditioner.

Weights: pretrained weights cannot be downloaded on every machine, so
``tiny: true`` builds small randomly initialised encoders of the *same classes* (used by the
tests and the laptop demo). Otherwise ``clip_pretrained`` is ``None`` (random init), an
open_clip pretrained tag (downloaded by open_clip when the network allows) or a local
checkpoint file; ``dino_pretrained`` is ``None``, ``"hub"`` (timm download) or a local file.
Local files load through open_clip / timm loaders, i.e. safetensors or
``torch.load(weights_only=True)``; a missing file is an error, never a silent random init.

Preprocessing: RGBA composited on white, shorter side resized to 224 (bicubic,
antialiased), centre-cropped to 224x224, then each encoder's own mean/std.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics (open_clip constants)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ConditionConfig:
    """Image conditioner. ``tiny`` swaps in small random encoders of the same classes."""

    clip_model: str = "ViT-L-14"                 # open_clip model name
    clip_pretrained: str | None = None           # None | open_clip tag | local checkpoint file
    dino_model: str = "vit_large_patch14_dinov2"  # timm model name
    dino_pretrained: str | None = None           # None | "hub" | local checkpoint file
    clip_tokens: Literal["all", "cls"] = "all"
    dino_tokens: Literal["all", "patch"] = "all"
    image_size: int = 224
    out_dim: int = 1024                          # width of every condition token
    train_encoders: bool = False
    tiny: bool = False
    tiny_width: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_clip_patch: int = 32                    # 7x7 patches at 224 px
    tiny_dino_patch: int = 28                    # 8x8 patches at 224 px

    def validate(self) -> None:
        if self.clip_tokens not in ("all", "cls"):
            raise ValueError(f"condition.clip_tokens must be 'all' or 'cls', got {self.clip_tokens!r}")
        if self.dino_tokens not in ("all", "patch"):
            raise ValueError(f"condition.dino_tokens must be 'all' or 'patch', got {self.dino_tokens!r}")
        if self.image_size < 14:
            raise ValueError(f"condition.image_size must be >= 14, got {self.image_size}")
        if self.out_dim < 1:
            raise ValueError(f"condition.out_dim must be >= 1, got {self.out_dim}")
        if self.tiny:
            if self.tiny_width % self.tiny_heads:
                raise ValueError(f"condition.tiny_width {self.tiny_width} must be divisible by "
                                 f"tiny_heads {self.tiny_heads}")
            for name in ("tiny_clip_patch", "tiny_dino_patch"):
                patch = getattr(self, name)
                if patch < 1 or self.image_size % patch:
                    raise ValueError(f"condition.{name}={patch} must divide image_size {self.image_size}")


def _require_file(path: str, what: str, alternatives: str = "") -> Path:
    """Local weights are checked when the model is built (not when the config is parsed:
    configs are often parsed on a machine other than the one that trains)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"{what}: local weights file {str(p)!r} does not exist{alternatives}. Pretrained "
            f"weights cannot be downloaded on every machine; put the checkpoint there, use a "
            f"hub name where the network allows it, or set condition.tiny=true for random tiny "
            f"encoders.")
    return p


def build_clip_visual(cfg: ConditionConfig) -> nn.Module:
    """open_clip ``VisionTransformer``: tiny random, or the vision tower of ``cfg.clip_model``."""
    import open_clip
    from open_clip.transformer import VisionTransformer

    if cfg.tiny:
        return VisionTransformer(
            image_size=cfg.image_size, patch_size=cfg.tiny_clip_patch, width=cfg.tiny_width,
            layers=cfg.tiny_layers, heads=cfg.tiny_heads, mlp_ratio=4.0, output_dim=cfg.tiny_width)
    pretrained = cfg.clip_pretrained
    tags = open_clip.list_pretrained_tags_by_model(cfg.clip_model)
    # open_clip moves the model to a device itself: keep it on the current default device
    # (e.g. "meta" to size a paper-scale model without allocating it).
    device = torch.empty(0).device
    if pretrained is None:
        model = open_clip.create_model(cfg.clip_model, pretrained=None, device=device)
    elif pretrained in tags:
        model = open_clip.create_model(cfg.clip_model, pretrained=pretrained, device=device)
    else:
        path = _require_file(pretrained, "condition.clip_pretrained",
                             f" and is not an open_clip tag of {cfg.clip_model} {tags}")
        model = open_clip.create_model(cfg.clip_model, pretrained=None, device=device)
        # open_clip's loader: safetensors, or torch.load(weights_only=True); converts known
        # third-party layouts and resizes position embeddings.
        open_clip.load_checkpoint(model, str(path), weights_only=True)
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"condition.clip_model {cfg.clip_model!r} has a {type(visual).__name__} "
                         f"image tower; only ViT towers give the CLS + patch tokens used here")
    return visual


def build_dino(cfg: ConditionConfig) -> nn.Module:
    """timm DINOv2 ``VisionTransformer`` at ``cfg.image_size`` (pos-embed resampled on load)."""
    import timm

    if cfg.tiny:
        return timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=cfg.image_size,
            patch_size=cfg.tiny_dino_patch, embed_dim=cfg.tiny_width, depth=cfg.tiny_layers,
            num_heads=cfg.tiny_heads, num_classes=0)
    if cfg.dino_pretrained is None:
        return timm.create_model(cfg.dino_model, pretrained=False, img_size=cfg.image_size, num_classes=0)
    overlay = {}
    if cfg.dino_pretrained != "hub":
        overlay = dict(file=str(_require_file(cfg.dino_pretrained, "condition.dino_pretrained")))
    return timm.create_model(cfg.dino_model, pretrained=True, pretrained_cfg_overlay=overlay,
                             img_size=cfg.image_size, num_classes=0)


def composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 4] (or 3 channels, taken as opaque) -> float [B, 3, H, W] in [0, 1]."""
    if rgba.dim() != 4 or rgba.shape[-1] not in (3, 4):
        raise ValueError(f"expected images [B, H, W, 4] (RGBA) or [B, H, W, 3], got {tuple(rgba.shape)}")
    if rgba.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {rgba.dtype}")
    x = rgba.float().div(255.0).permute(0, 3, 1, 2)
    if x.shape[1] == 3:
        return x
    rgb, alpha = x[:, :3], x[:, 3:]
    return rgb * alpha + (1.0 - alpha)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size`` (bicubic, antialiased), then a centred ``size`` x ``size`` crop."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[..., top: top + size, left: left + size]
    return x.clamp(0.0, 1.0)


def images_to_tensor(images: torch.Tensor | np.ndarray | Sequence) -> torch.Tensor:
    """Stack uint8 arrays/tensors [B,H,W,C] / [H,W,C] or a list of PIL images / arrays into
    one uint8 tensor [B, H, W, C] (PIL images are converted to RGBA)."""
    if isinstance(images, np.ndarray):
        # Arrays from Arrow/Parquet are often read-only; torch wants writable memory.
        images = torch.from_numpy(images if images.flags.writeable else images.copy())
    if torch.is_tensor(images):
        return images.unsqueeze(0) if images.dim() == 3 else images
    if len(images) == 0:
        raise ValueError("no images given")
    arrays = []
    for im in images:
        if hasattr(im, "convert"):  # PIL.Image
            im = im.convert("RGBA")
        arrays.append(torch.as_tensor(np.array(im)))  # np.array copies: writable
    shapes = {tuple(a.shape) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in one batch must share a shape, got {sorted(shapes)}")
    return torch.stack(arrays)


class ImageConditioner(nn.Module):
    """RGBA views -> condition tokens [B, T_cond, out_dim] = [CLIP tokens; DINOv2 tokens]."""

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        cfg.validate()
        if not cfg.tiny and cfg.dino_pretrained not in (None, "hub"):
            _require_file(cfg.dino_pretrained, "condition.dino_pretrained")  # fail before building CLIP
        self.cfg = cfg
        self.clip = build_clip_visual(cfg)
        self.dino = build_dino(cfg)
        clip_mean = getattr(self.clip, "image_mean", None) or CLIP_MEAN
        clip_std = getattr(self.clip, "image_std", None) or CLIP_STD
        dino_data = self.dino.pretrained_cfg
        self.register_buffer("clip_mean", torch.tensor(clip_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(clip_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("dino_mean", torch.tensor(dino_data["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("dino_std", torch.tensor(dino_data["std"]).view(1, 3, 1, 1), persistent=False)
        self.clip_proj = nn.Linear(self.clip.transformer.width, cfg.out_dim)
        self.dino_proj = nn.Linear(self.dino.embed_dim, cfg.out_dim)
        if not cfg.train_encoders:
            self.clip.requires_grad_(False)
            self.dino.requires_grad_(False)
        self.train(False)

    @property
    def num_tokens(self) -> int:
        clip_grid = self.clip.grid_size[0] * self.clip.grid_size[1]
        dino_grid = self.dino.patch_embed.num_patches
        clip_n = 1 + clip_grid if self.cfg.clip_tokens == "all" else 1
        dino_prefix = self.dino.num_prefix_tokens
        dino_n = dino_prefix + dino_grid if self.cfg.dino_tokens == "all" else dino_grid
        return clip_n + dino_n

    def train(self, mode: bool = True) -> "ImageConditioner":
        # Frozen encoders stay in eval mode (dropout/drop-path off) even while the owner trains.
        super().train(mode)
        if not self.cfg.train_encoders:
            self.clip.eval()
            self.dino.eval()
        return self

    def preprocess(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """RGBA uint8 images -> (CLIP input, DINOv2 input), float [B, 3, S, S] each."""
        rgba = images_to_tensor(images).to(self.clip_mean.device)
        x = resize_center_crop(composite_on_white(rgba), self.cfg.image_size)
        return (x - self.clip_mean) / self.clip_std, (x - self.dino_mean) / self.dino_std

    def encode_clip(self, x: torch.Tensor) -> torch.Tensor:
        out = self.clip.forward_intermediates(
            x, indices=1, normalize_intermediates=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        cls, patches = out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]
        return cls if self.cfg.clip_tokens == "cls" else torch.cat([cls, patches], dim=1)

    def encode_dino(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.dino.forward_features(x)  # final norm applied; [B, prefix + patches, D]
        if self.cfg.dino_tokens == "patch":
            tokens = tokens[:, self.dino.num_prefix_tokens:]
        return tokens

    def forward(self, images) -> torch.Tensor:
        clip_in, dino_in = self.preprocess(images)
        # Match the encoders' weights if the module was cast (e.g. DeepSpeed bf16).
        clip_in = clip_in.to(self.clip_proj.weight.dtype)
        dino_in = dino_in.to(self.dino_proj.weight.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.train_encoders):
            clip_tokens = self.encode_clip(clip_in)
            dino_tokens = self.encode_dino(dino_in)
        return torch.cat([self.clip_proj(clip_tokens), self.dino_proj(dino_tokens)], dim=1)
