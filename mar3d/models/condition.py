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

The module is split where training splits it:

* :class:`ImageEncoder` -- the two **frozen** towers (eval mode, no gradients). One per
  release: MAR-LR and MAR-HR share it, it is stored once (its own model folder, kind
  ``cond``), never in their weights, and inference runs it once per image for both
  stages. It returns *all* tokens of both towers (:class:`EncoderFeatures`), so what it
  computes does not depend on a stage's choices and can be cached.

  One deviation, for the case without pretrained weights: with ``tiny`` and
  ``train_encoders`` the random towers are trained together with MAR-LR (a random
  network was never trained to see, so freezing it only freezes noise); MAR-LR's
  trained towers become the release's one encoder and MAR-HR trains on them, frozen.
  Pretrained towers (the paper's path) always stay frozen.
* :class:`ConditionProjection` -- the trainable part of each stage: token selection and
  one Linear per tower to ``out_dim``.

``ENCODER_FIELDS`` of :class:`ConditionConfig` describe the encoder; ``clip_tokens``,
``dino_tokens`` and ``out_dim`` the projection. Random weights (``tiny``, or no
pretrained source) are drawn from ``init_seed`` alone, so two stages that build the
encoder from the same config get the same weights (and the same ``conditioner_id``).

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

# The ConditionConfig fields that define the frozen encoder (everything else belongs to a
# stage's projection).
ENCODER_FIELDS = ("clip_model", "clip_pretrained", "dino_model", "dino_pretrained", "image_size",
                  "init_seed", "tiny", "tiny_width", "tiny_layers", "tiny_heads", "tiny_clip_patch",
                  "tiny_dino_patch")


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
    # Tiny random towers only (the no-pretrained-weights case): MAR-LR trains them with its
    # own weights and saves them as the release's encoder; MAR-HR then trains on those,
    # frozen (its condition_model_uri must be LR's). Pretrained towers stay frozen: true
    # with tiny: false is refused (mar3d.train.config).
    train_encoders: bool = False
    init_seed: int = 0                           # random tower weights come from this seed alone
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


@dataclass(frozen=True)
class EncoderSpec:
    """Shapes of :class:`ImageEncoder`'s output that a projection is built for (saved in
    every MAR model folder, so a stage can be rebuilt without its encoder)."""

    clip_width: int
    dino_width: int
    clip_patches: int        # CLIP tokens = 1 (CLS) + clip_patches
    dino_prefix: int         # DINOv2 tokens = dino_prefix (CLS, registers) + dino_patches
    dino_patches: int


EncoderFeatures = dict  # {"clip": [B, 1 + Pc, Dc], "dino": [B, prefix + Pd, Dd]}


def encoder_config(cfg: ConditionConfig) -> dict:
    """The encoder part of a condition config, as plain data."""
    return {name: getattr(cfg, name) for name in ENCODER_FIELDS}


def encoder_differences(a: ConditionConfig, b: ConditionConfig) -> list[str]:
    """``field: a != b`` for each encoder field on which two configs disagree."""
    return [f"{n}: {getattr(a, n)!r} != {getattr(b, n)!r}" for n in ENCODER_FIELDS
            if getattr(a, n) != getattr(b, n)]


class ImageEncoder(nn.Module):
    """RGBA views -> all CLIP and DINOv2 tokens (:data:`EncoderFeatures`). Frozen."""

    def __init__(self, cfg: ConditionConfig):
        super().__init__()
        cfg.validate()
        if not cfg.tiny and cfg.dino_pretrained not in (None, "hub"):
            _require_file(cfg.dino_pretrained, "condition.dino_pretrained")  # fail before building CLIP
        self.cfg = cfg
        # Random weights depend on init_seed only, not on whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            self.clip = build_clip_visual(cfg)
            self.dino = build_dino(cfg)
        self.register_normalization()
        self.frozen = True
        self.requires_grad_(False)
        self.train(False)

    def register_normalization(self) -> None:
        """Each tower's input mean/std (not saved: they follow from the towers)."""
        clip_mean = getattr(self.clip, "image_mean", None) or CLIP_MEAN
        clip_std = getattr(self.clip, "image_std", None) or CLIP_STD
        dino_data = self.dino.pretrained_cfg
        with torch.device("cpu"):  # real values even when the towers are built on "meta"
            for name, values in (("clip_mean", clip_mean), ("clip_std", clip_std),
                                 ("dino_mean", dino_data["mean"]), ("dino_std", dino_data["std"])):
                self.register_buffer(name, torch.tensor(values).view(1, 3, 1, 1), persistent=False)

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(clip_width=self.clip.transformer.width, dino_width=self.dino.embed_dim,
                           clip_patches=self.clip.grid_size[0] * self.clip.grid_size[1],
                           dino_prefix=self.dino.num_prefix_tokens,
                           dino_patches=self.dino.patch_embed.num_patches)

    def train(self, mode: bool = True) -> "ImageEncoder":
        # Frozen: eval mode (dropout/drop-path off) whatever its owner does.
        return super().train(mode and not getattr(self, "frozen", True))

    def unfreeze(self) -> "ImageEncoder":
        """Trainable towers (``ConditionConfig.train_encoders``): gradients flow through
        :meth:`features`, and the owner's train/eval mode applies."""
        self.frozen = False
        return self.requires_grad_(True)

    def preprocess(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """RGBA uint8 images -> (CLIP input, DINOv2 input), float [B, 3, S, S] each."""
        rgba = images_to_tensor(images).to(self.clip_mean.device)
        x = resize_center_crop(composite_on_white(rgba), self.cfg.image_size)
        return (x - self.clip_mean) / self.clip_std, (x - self.dino_mean) / self.dino_std

    def encode_clip(self, x: torch.Tensor) -> torch.Tensor:
        out = self.clip.forward_intermediates(
            x, indices=1, normalize_intermediates=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][-1], out["image_intermediates"][-1]], dim=1)

    @torch.no_grad()
    def forward(self, images) -> EncoderFeatures:
        """Images [B, H, W, C] (or a list of same-sized images) -> features of B images."""
        return self.features(images)

    def features(self, images) -> EncoderFeatures:
        """``forward`` with gradients, for towers that train (:meth:`unfreeze`)."""
        clip_in, dino_in = self.preprocess(images)
        dtype = self.clip.conv1.weight.dtype  # match the towers if the module was cast
        return {"clip": self.encode_clip(clip_in.to(dtype)),
                # final norm applied; [B, prefix + patches, D]
                "dino": self.dino.forward_features(dino_in.to(dtype))}

    def encode(self, images) -> EncoderFeatures:
        """Like ``forward``, but a list of images of different sizes is encoded one image at
        a time (they cannot share one tensor; the encoder resizes anyway)."""
        if isinstance(images, (list, tuple)) and len({np.shape(im) for im in images}) > 1:
            parts = [self([im]) for im in images]
            return {k: torch.cat([p[k] for p in parts]) for k in ("clip", "dino")}
        return self(images)


class ConditionProjection(nn.Module):
    """A stage's trainable view of the encoder features: the configured tokens of each
    tower, each mapped by its own Linear to ``out_dim``, concatenated
    ``[CLIP tokens; DINOv2 tokens]`` -> [B, num_tokens, out_dim]."""

    def __init__(self, cfg: ConditionConfig, spec: EncoderSpec):
        super().__init__()
        cfg.validate()
        self.cfg, self.spec = cfg, spec
        self.clip_proj = nn.Linear(spec.clip_width, cfg.out_dim)
        self.dino_proj = nn.Linear(spec.dino_width, cfg.out_dim)

    @property
    def num_tokens(self) -> int:
        clip_n = 1 + self.spec.clip_patches if self.cfg.clip_tokens == "all" else 1
        dino_n = self.spec.dino_patches + (self.spec.dino_prefix if self.cfg.dino_tokens == "all" else 0)
        return clip_n + dino_n

    def forward(self, features: EncoderFeatures) -> torch.Tensor:
        clip, dino = features["clip"], features["dino"]
        expected = {"clip": (1 + self.spec.clip_patches, self.spec.clip_width),
                    "dino": (self.spec.dino_prefix + self.spec.dino_patches, self.spec.dino_width)}
        for name, tensor in (("clip", clip), ("dino", dino)):
            if tensor.dim() != 3 or tuple(tensor.shape[1:]) != expected[name]:
                raise ValueError(f"{name} features must be [B, {expected[name][0]}, {expected[name][1]}] "
                                 f"(the encoder this model was trained with), got {tuple(tensor.shape)}")
        if self.cfg.clip_tokens == "cls":
            clip = clip[:, :1]
        if self.cfg.dino_tokens == "patch":
            dino = dino[:, self.spec.dino_prefix:]
        return torch.cat([self.clip_proj(clip.to(self.clip_proj.weight.dtype)),
                          self.dino_proj(dino.to(self.dino_proj.weight.dtype))], dim=1)
