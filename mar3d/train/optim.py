"""Optimizer, learning-rate schedule and EMA: small pure pieces of the training loop.

* AdamW with weight decay on weight matrices only (:func:`no_decay_reason`): biases and
  norms (1-D), positional embeddings, learned tokens and VAE query sets, and the whole
  per-token diffusion head (MAR exempts its ``diffloss`` the same way) are not decayed.
* Linear warm-up to the base LR, then half-cosine to ``min_lr_ratio * lr`` at the last
  step (MAR-3D: 5000-step warm-up then cosine). Expressed as a multiplier for
  ``torch.optim.lr_scheduler.LambdaLR`` so DeepSpeed checkpoints it with the optimizer.
* EMA of the trainable parameters, kept in fp32 on the parameters' device.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

# Learned embeddings and tokens (position embeddings, CLS/mask/"fake" condition tokens,
# VAE query sets): decaying them pulls positions and tokens towards zero, i.e. towards
# each other, which is never what weight decay is for.
_EMBEDDING = re.compile(r"(^|\.)(enc_pos|dec_pos|diff_pos|pos_embed|positional_embedding|"
                        r"class_embedding|cls_token|reg_token|mask_token|fake_cond|fake_lr)$"
                        r"|(^|\.)queries\.")
_DIFFUSION_HEAD = re.compile(r"(^|\.)diffusion\.")


def no_decay_reason(name: str, param: torch.Tensor) -> str | None:
    """Why parameter ``name`` is exempt from weight decay, or None when it is decayed."""
    if param.ndim < 2:
        return "bias or norm"
    if _EMBEDDING.search(name):
        return "embedding or learned token"
    if _DIFFUSION_HEAD.search(name):
        return "diffusion head"
    return None


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR / base LR at optimizer step ``step`` (0-based: the multiplier used by that step)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: decayed, and exempt (see :func:`no_decay_reason`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_decay_reason(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    warmup_steps: int, total_steps: int, min_lr_ratio: float):
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, warmup_steps, total_steps, min_lr_ratio))
    return optimizer, scheduler


class EMA:
    """Exponential moving average of a model's trainable parameters.

    ``decay`` is warmed up as min(decay, (1 + n) / (10 + n)) so early, poor weights do
    not dominate the average of a short run."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(p.detach().float(), alpha=1.0 - d)
        self.num_updates += 1

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()`` with trainable parameters replaced by their averages
        (buffers and frozen parameters as they are), in the model's dtypes."""
        out = {}
        for n, t in model.state_dict().items():
            out[n] = self.shadow[n].to(t.dtype) if n in self.shadow else t
        return out

    def averaged_copy(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` holding the averaged weights (``model`` is left as it is)."""
        import copy

        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.state_dict_for(model))
        return averaged

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to restore the EMA (for a safetensors checkpoint file)."""
        out = dict(self.shadow)
        out["__num_updates__"] = torch.tensor([self.num_updates], dtype=torch.int64)
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise KeyError(f"EMA checkpoint lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        for n in self.shadow:
            self.shadow[n].copy_(tensors[n])
        self.num_updates = int(tensors["__num_updates__"].item())
