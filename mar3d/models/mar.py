"""MAR-LR and MAR-HR: masked autoregressive generators of continuous shape-latent tokens.

A port of MAR (Li et al. 2024, LTH14/mar) to MAR-3D's cascade:

* An MAE-style encoder sees a **prefix** (condition tokens, never masked) followed by the
  *known* latent tokens only (masked ones are dropped, not replaced); a decoder fills mask
  tokens back in; learned position embeddings cover prefix + sequence in both.
* Every decoder output of a masked position conditions a per-token diffusion head
  (:mod:`mar3d.models.diffusion`) that models the token's continuous distribution; the loss
  is that head's diffusion loss on masked tokens only.
* Training: one random order per sample, one mask ratio per batch from a truncated normal
  on [0.7, 1] (all samples keep the same number of known tokens, so the encoder input stays
  a dense tensor), classifier-free-guidance dropout: with probability ``cfg_dropout`` a
  sample's whole prefix is replaced by a learned "fake" latent.
* **MAR-LR** (stage "lr") generates the coarse token set from the image tokens.
* **MAR-HR** (stage "hr") also sees the LR tokens: Linear(C -> width), appended to the
  prefix. They go through **condition augmentation** x' = t*eps + (1-t)*x_LR, with
  t ~ U(t_min, t_max) in training and a fixed ``t_infer`` at inference (0.5 in the paper), so
  HR learns to trust LR tokens only as far as generated LR tokens deserve.
  With ``uncond_drops_lr`` (default, "fake latent replaces the whole prefix") the
  unconditional branch drops the LR tokens too; otherwise only the image tokens.
* Inference: ``num_inference_steps`` steps reveal tokens on the cosine schedule, each sampled by the
  diffusion head with CFG whose scale ramps linearly with the fraction generated.

``ConditionalMAR`` bundles a stage's condition projection with a MAR model, so callers go
straight from image-encoder features to tokens; the frozen encoder itself is shared by the
cascade and kept outside (:mod:`mar3d.models.condition`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mar3d.models.attention import Block
from mar3d.models.condition import ConditionConfig, ConditionProjection, EncoderFeatures, EncoderSpec
from mar3d.models.diffusion import DiffusionConfig, GaussianDiffusion, gaussian_noise
from mar3d.models.rng import Generators, check_per_item
from mar3d.models.schedules import (cosine_mask_schedule, guidance_ramp, mask_from_orders,
                                    random_orders, sample_mask_ratio)


SAMPLING_FIELDS = ("num_inference_steps", "guidance_scale", "temperature", "diffusion_steps",
                   "timestep_spacing")


@dataclass
class SamplingConfig:
    """How a MAR stage samples its tokens: the one sampling config of the project.

    A model's config holds its defaults (MAR-3D: 64 steps, guidance 3.0, 100 diffusion
    steps); a pipeline's and every per-call argument hold overrides, where ``None`` means
    "the model's own". ``timestep_spacing`` None: the model's ``diffusion.timestep_spacing``."""

    num_inference_steps: int | None = None  # autoregressive steps on the cosine schedule
    guidance_scale: float | None = None     # final classifier-free guidance, ramped linearly
    temperature: float | None = None
    diffusion_steps: int | None = None      # respaced diffusion-head sampling steps
    timestep_spacing: str | None = None     # "leading" | "linspace"

    def validate(self, where: str = "sampling") -> None:
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"{where}.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.guidance_scale is not None and self.guidance_scale < 1.0:
            raise ValueError(f"{where}.guidance_scale must be >= 1 (1 disables guidance), "
                             f"got {self.guidance_scale}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"{where}.temperature must be > 0, got {self.temperature}")
        if self.diffusion_steps is not None and self.diffusion_steps < 1:
            raise ValueError(f"{where}.diffusion_steps must be >= 1, got {self.diffusion_steps}")
        if self.timestep_spacing not in (None, "leading", "linspace"):
            raise ValueError(f"{where}.timestep_spacing must be leading, linspace or null, "
                             f"got {self.timestep_spacing!r}")

    def overrides(self) -> dict[str, int | float | str]:
        """The settings this config sets (not None), by name."""
        return {name: getattr(self, name) for name in SAMPLING_FIELDS if getattr(self, name) is not None}

    def over(self, base: "SamplingConfig") -> "SamplingConfig":
        """``base`` with this config's settings on top."""
        return SamplingConfig(**{**base.overrides(), **self.overrides()})


def _paper_sampling() -> SamplingConfig:
    return SamplingConfig(num_inference_steps=64, guidance_scale=3.0, temperature=1.0, diffusion_steps=100)


@dataclass
class MARConfig:
    """One MAR stage. ``seq_len`` / ``token_dim`` must match the VAE's latents for that stage."""

    stage: Literal["lr", "hr"] = "lr"
    seq_len: int = 256                 # tokens generated by this stage (LR 256, HR 1024)
    # Which VAE latents the stage generates (None: its own stage's). ``stage: lr`` with
    # ``latents: hr`` is the paper's single-stage "joint" ablation: one MAR that generates
    # the HR token set from the image alone, with no MAR-HR after it.
    latents: Literal["lr", "hr"] | None = None
    token_dim: int = 64                # latent channels C
    width: int = 1024
    heads: int = 16
    enc_layers: int = 16
    dec_layers: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1               # projection / MLP dropout
    attn_dropout: float = 0.1
    qkv_bias: bool = True
    lr_seq_len: int = 256              # HR only: number of LR tokens in the prefix
    cfg_dropout: float = 0.1           # probability of the unconditional (fake) prefix in training
    uncond_drops_lr: bool = True       # HR: unconditional branch also replaces the LR tokens
    mask_ratio_min: float = 0.7
    mask_ratio_loc: float = 1.0
    mask_ratio_scale: float = 0.25
    cond_aug_t_min: float = 0.4        # HR condition augmentation, training t ~ U(min, max)
    cond_aug_t_max: float = 0.6
    cond_aug_t_infer: float = 0.5      # HR condition augmentation at inference
    grad_checkpointing: bool = False
    # The model works on normalized latents x = (z - shift) / scale (MAR scales its VAE
    # latents the same way); the training stage fills these from the frozen VAE's measured
    # statistics, so a saved model knows how to map its tokens back to the VAE.
    latent_shift: float = 0.0
    latent_scale: float = 1.0
    lr_latent_shift: float = 0.0       # HR: the same for the LR tokens of its prefix
    lr_latent_scale: float = 1.0
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=_paper_sampling)  # this model's defaults

    @property
    def target_level(self) -> str:
        """The VAE latents this stage generates: ``latents``, else its stage's."""
        return self.latents or self.stage

    def validate(self) -> None:
        if self.stage not in ("lr", "hr"):
            raise ValueError(f"mar.stage must be 'lr' or 'hr', got {self.stage!r}")
        if self.latents not in (None, "lr", "hr"):
            raise ValueError(f"mar.latents must be 'lr', 'hr' or null, got {self.latents!r}")
        if self.stage == "hr" and self.target_level != "hr":
            raise ValueError("mar.latents: a MAR-HR stage generates HR latents")
        for name in ("seq_len", "token_dim", "width", "heads", "enc_layers", "dec_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"mar.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"mar.width ({self.width}) must be divisible by mar.heads ({self.heads})")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mar.mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name in ("dropout", "attn_dropout", "cfg_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"mar.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.stage == "hr" and self.lr_seq_len < 1:
            raise ValueError(f"mar.lr_seq_len must be >= 1 for stage 'hr', got {self.lr_seq_len}")
        if not 0.0 <= self.mask_ratio_min < 1.0:
            raise ValueError(f"mar.mask_ratio_min must be in [0, 1), got {self.mask_ratio_min}")
        if self.mask_ratio_scale <= 0:
            raise ValueError(f"mar.mask_ratio_scale must be > 0, got {self.mask_ratio_scale}")
        if not 0.0 <= self.cond_aug_t_min <= self.cond_aug_t_max <= 1.0:
            raise ValueError(f"need 0 <= mar.cond_aug_t_min <= cond_aug_t_max <= 1, got "
                             f"{self.cond_aug_t_min}, {self.cond_aug_t_max}")
        if not 0.0 <= self.cond_aug_t_infer <= 1.0:
            raise ValueError(f"mar.cond_aug_t_infer must be in [0, 1], got {self.cond_aug_t_infer}")
        if not (self.latent_scale > 0 and self.lr_latent_scale > 0):
            raise ValueError(f"mar.latent_scale and lr_latent_scale must be > 0, got "
                             f"{self.latent_scale}, {self.lr_latent_scale}")
        self.diffusion.validate()
        self.sampling.validate("mar.sampling")
        unset = [name for name in SAMPLING_FIELDS[:4] if getattr(self.sampling, name) is None]
        if unset:
            raise ValueError(f"a model's mar.sampling must set {', '.join(unset)} (its defaults)")
        if self.sampling.num_inference_steps > self.seq_len:
            raise ValueError(f"mar.sampling.num_inference_steps ({self.sampling.num_inference_steps}) "
                             f"must be <= mar.seq_len ({self.seq_len})")


def augment_lr(x_lr: torch.Tensor, t: float | torch.Tensor,
               generator: Generators = None) -> torch.Tensor:
    """Condition augmentation ``t * eps + (1 - t) * x_lr``; ``t`` a scalar or one per sample [B]."""
    if not torch.is_tensor(t):
        t = torch.tensor(float(t))
    t = t.to(x_lr.device, x_lr.dtype).reshape(-1, *([1] * (x_lr.dim() - 1)))
    if ((t < 0) | (t > 1)).any():
        raise ValueError("condition augmentation t must be in [0, 1]")
    eps = gaussian_noise(tuple(x_lr.shape), generator, x_lr)
    return t * eps + (1 - t) * x_lr


class MAR(nn.Module):
    """Masked autoregressive generator of ``cfg.seq_len`` tokens of ``cfg.token_dim`` channels,
    conditioned on ``cond_len`` condition tokens of width ``cond_dim`` (and, for HR, LR tokens)."""

    def __init__(self, cfg: MARConfig, cond_dim: int, cond_len: int):
        super().__init__()
        cfg.validate()
        if cond_dim < 1 or cond_len < 1:
            raise ValueError(f"cond_dim and cond_len must be >= 1, got {cond_dim}, {cond_len}")
        self.cfg = cfg
        self.cond_dim = cond_dim
        self.cond_len = cond_len
        self.is_hr = cfg.stage == "hr"
        self.prefix_len = cond_len + (cfg.lr_seq_len if self.is_hr else 0)
        total = self.prefix_len + cfg.seq_len
        w = cfg.width

        self.cond_proj = nn.Linear(cond_dim, w)
        self.fake_cond = nn.Parameter(torch.zeros(1, cond_len, w))
        if self.is_hr:
            self.lr_proj = nn.Linear(cfg.token_dim, w)
            self.fake_lr = nn.Parameter(torch.zeros(1, cfg.lr_seq_len, w))
        self.token_proj = nn.Linear(cfg.token_dim, w)
        self.enc_pos = nn.Parameter(torch.zeros(1, total, w))
        self.enc_in_norm = nn.LayerNorm(w, eps=1e-6)

        def blocks(n: int) -> nn.ModuleList:
            return nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                                       drop=cfg.dropout, attn_drop=cfg.attn_dropout) for _ in range(n))

        self.enc_blocks = blocks(cfg.enc_layers)
        self.enc_norm = nn.LayerNorm(w, eps=1e-6)
        self.dec_embed = nn.Linear(w, w)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        self.dec_pos = nn.Parameter(torch.zeros(1, total, w))
        self.dec_blocks = blocks(cfg.dec_layers)
        self.dec_norm = nn.LayerNorm(w, eps=1e-6)
        self.diff_pos = nn.Parameter(torch.zeros(1, cfg.seq_len, w))
        self._init_weights()
        # Built after the init above: the diffusion head has its own (zero-output) init.
        self.diffusion = GaussianDiffusion(cfg.token_dim, w, cfg.diffusion)

    def _init_weights(self) -> None:
        for p in (self.fake_cond, self.enc_pos, self.mask_token, self.dec_pos, self.diff_pos):
            nn.init.normal_(p, std=0.02)
        if self.is_hr:
            nn.init.normal_(self.fake_lr, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ latent space
    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the tokens this model generates."""
        return (z - self.cfg.latent_shift) / self.cfg.latent_scale

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Generated tokens -> VAE latents (what the VAE decoder takes)."""
        return x * self.cfg.latent_scale + self.cfg.latent_shift

    def normalize_lr(self, z_lr: torch.Tensor) -> torch.Tensor:
        """HR: VAE LR latents -> the LR tokens of this model's prefix."""
        return (z_lr - self.cfg.lr_latent_shift) / self.cfg.lr_latent_scale

    # ------------------------------------------------------------------ pieces
    def _check_inputs(self, cond: torch.Tensor, lr_tokens: torch.Tensor | None,
                      tokens: torch.Tensor | None = None) -> None:
        if cond.dim() != 3 or cond.shape[1:] != (self.cond_len, self.cond_dim):
            raise ValueError(f"cond must be [B, {self.cond_len}, {self.cond_dim}], got {tuple(cond.shape)}")
        b = cond.shape[0]
        if tokens is not None and tuple(tokens.shape) != (b, self.cfg.seq_len, self.cfg.token_dim):
            raise ValueError(f"tokens must be [{b}, {self.cfg.seq_len}, {self.cfg.token_dim}], "
                             f"got {tuple(tokens.shape)}")
        if self.is_hr:
            expected = (b, self.cfg.lr_seq_len, self.cfg.token_dim)
            if lr_tokens is None:
                raise ValueError("MAR-HR needs lr_tokens (the LR stage's output)")
            if tuple(lr_tokens.shape) != expected:
                raise ValueError(f"lr_tokens must be {list(expected)}, got {tuple(lr_tokens.shape)}")
        elif lr_tokens is not None:
            raise ValueError("MAR-LR takes no lr_tokens; use a stage 'hr' model for the cascade")

    def build_prefix(self, cond: torch.Tensor, lr_tokens: torch.Tensor | None = None,
                     drop: torch.Tensor | None = None) -> torch.Tensor:
        """Prefix [B, prefix_len, width]; rows where ``drop`` [B] is True get the fake latent.

        ``lr_tokens`` are used as given (condition augmentation is the caller's job).
        """
        c = self.cond_proj(cond)
        if drop is not None:
            c = torch.where(drop[:, None, None], self.fake_cond.to(c.dtype), c)
        if not self.is_hr:
            return c
        lr = self.lr_proj(lr_tokens)
        if drop is not None and self.cfg.uncond_drops_lr:
            lr = torch.where(drop[:, None, None], self.fake_lr.to(lr.dtype), lr)
        return torch.cat([c, lr], dim=1)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _keep_mask(self, mask: torch.Tensor) -> torch.Tensor:
        prefix = torch.ones(mask.shape[0], self.prefix_len, dtype=torch.bool, device=mask.device)
        return torch.cat([prefix, ~mask], dim=1)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Encoder over prefix + known tokens; ``mask`` [B, T] True = unknown (dropped).

        Every row must have the same number of masked tokens. Returns [B, P + known, width].
        """
        b = tokens.shape[0]
        counts = mask.sum(dim=1)
        if (counts != counts[0]).any():
            raise ValueError("every sample must mask the same number of tokens")
        x = torch.cat([prefix, self.token_proj(tokens)], dim=1) + self.enc_pos
        x = self.enc_in_norm(x)
        x = x[self._keep_mask(mask)].reshape(b, -1, self.cfg.width)
        return self.enc_norm(self._run(self.enc_blocks, x))

    def decode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Decoder: mask tokens at unknown positions -> diffusion conditions z [B, T, width]."""
        b = x.shape[0]
        x = self.dec_embed(x)
        full = self.mask_token.to(x.dtype).expand(b, self.prefix_len + self.cfg.seq_len, -1).clone()
        full[self._keep_mask(mask)] = x.reshape(-1, self.cfg.width)
        x = self.dec_norm(self._run(self.dec_blocks, full + self.dec_pos))
        return x[:, self.prefix_len:] + self.diff_pos

    def sample_aug_t(self, batch: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Training-time condition-augmentation strengths t ~ U(t_min, t_max), [batch]."""
        lo, hi = self.cfg.cond_aug_t_min, self.cfg.cond_aug_t_max
        return lo + (hi - lo) * torch.rand(batch, device=device)

    # ------------------------------------------------------------------ training
    def forward(self, tokens: torch.Tensor, cond: torch.Tensor,
                lr_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training loss for ground-truth ``tokens`` [B, T, C] given ``cond`` [B, Tc, D]
        (and ``lr_tokens`` [B, T_lr, C] for HR). Randomness comes from the global torch RNG.

        Returns ``loss`` plus diagnostics: ``mask`` [B, T] (True = masked, supervised),
        ``mask_ratio``, ``cond_dropped`` [B] and, for HR, ``aug_t`` [B].
        """
        self._check_inputs(cond, lr_tokens, tokens)
        b, seq_len, _ = tokens.shape
        device = tokens.device
        out: dict[str, torch.Tensor] = {}
        if self.is_hr:
            t = self.sample_aug_t(b, device)
            lr_tokens = augment_lr(lr_tokens, t)
            out["aug_t"] = t
        drop = torch.rand(b, device=device) < self.cfg.cfg_dropout if self.training else None
        prefix = self.build_prefix(cond, lr_tokens, drop)

        ratio = sample_mask_ratio(1, low=self.cfg.mask_ratio_min, loc=self.cfg.mask_ratio_loc,
                                  scale=self.cfg.mask_ratio_scale)[0]
        num_masked = max(1, min(seq_len, math.ceil(seq_len * ratio.item())))
        mask = mask_from_orders(random_orders(b, seq_len, device=device), num_masked)

        z = self.decode(self.encode(tokens, mask, prefix), mask)
        # Only masked tokens are supervised, so only they go through the diffusion head.
        loss = self.diffusion.training_loss(tokens[mask], z[mask])
        out.update(loss=loss, mask=mask, mask_ratio=ratio,
                   cond_dropped=drop if drop is not None else torch.zeros(b, dtype=torch.bool, device=device))
        return out

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, lr_tokens: torch.Tensor | None = None,
               generator: Generators = None, aug_t: float | None = None,
               **sampling) -> torch.Tensor:
        """Sample tokens [B, T, C]. ``sampling``: :class:`SamplingConfig` settings
        (``num_inference_steps``, ``guidance_scale``, ...); those left out or None come from
        ``cfg.sampling``, ``aug_t`` from ``cond_aug_t_infer``.
        Same ``generator`` state -> same tokens. ``generator`` may be one generator per
        sample: each sample then draws only from its own (mask order, condition
        augmentation, diffusion noise), so its tokens do not depend on its batch mates."""
        self._check_inputs(cond, lr_tokens)
        check_per_item(generator, cond.shape[0])
        s = SamplingConfig(**sampling).over(self.cfg.sampling)
        s.validate()
        was_training = self.training
        self.eval()
        try:
            return self._sample(cond, s, lr_tokens, generator,
                                self.cfg.cond_aug_t_infer if aug_t is None else aug_t)
        finally:
            self.train(was_training)

    def _sample(self, cond: torch.Tensor, s: SamplingConfig, lr_tokens: torch.Tensor | None,
                generator: Generators, aug_t: float) -> torch.Tensor:
        b, device = cond.shape[0], cond.device
        seq_len, c = self.cfg.seq_len, self.cfg.token_dim
        if self.is_hr:
            lr_tokens = augment_lr(lr_tokens, aug_t, generator)
        guided = s.guidance_scale != 1.0
        prefix = self.build_prefix(cond, lr_tokens)
        if guided:
            everything = torch.ones(b, dtype=torch.bool, device=device)
            prefix = torch.cat([prefix, self.build_prefix(cond, lr_tokens, drop=everything)])

        # Known tokens feed token_proj, so they live in its parameter dtype (float32, or bf16
        # when the module was cast); the result is handed back in float32.
        tokens = torch.zeros(b, seq_len, c, device=device, dtype=self.token_proj.weight.dtype)
        mask = torch.ones(b, seq_len, dtype=torch.bool, device=device)
        orders = random_orders(b, seq_len, generator, device)
        masked = seq_len
        for reveal in cosine_mask_schedule(seq_len, s.num_inference_steps):
            masked -= reveal
            next_mask = mask_from_orders(orders, masked)
            to_predict = mask & ~next_mask
            tok_in, mask_in = (torch.cat([tokens, tokens]), torch.cat([mask, mask])) if guided else (tokens, mask)
            z = self.decode(self.encode(tok_in, mask_in, prefix), mask_in)
            # Boolean indexing is batch-major: with guidance the rows are [cond; uncond].
            rows = torch.cat([to_predict, to_predict]) if guided else to_predict
            scale = guidance_ramp(s.guidance_scale, seq_len - masked, seq_len) if guided else None
            sampled = self.diffusion.sample(z[rows], s.diffusion_steps, s.temperature, scale, generator,
                                            spacing=s.timestep_spacing)
            tokens[to_predict] = sampled[: b * reveal].to(tokens.dtype)
            mask = next_mask
        return tokens.float()


class ConditionalMAR(nn.Module):
    """A stage's trainable condition projection + MAR: image-encoder features
    (:class:`~mar3d.models.condition.ImageEncoder` output, computed outside: the encoder is
    frozen and shared by both stages) straight to tokens / loss."""

    def __init__(self, cond_cfg: ConditionConfig, mar_cfg: MARConfig, encoder: EncoderSpec):
        super().__init__()
        self.conditioner = ConditionProjection(cond_cfg, encoder)
        self.mar = MAR(mar_cfg, cond_dim=cond_cfg.out_dim, cond_len=self.conditioner.num_tokens)

    def forward(self, features: EncoderFeatures, tokens: torch.Tensor,
                lr_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.mar(tokens, self.conditioner(features), lr_tokens)

    @torch.no_grad()
    def sample(self, features: EncoderFeatures, lr_tokens: torch.Tensor | None = None,
               generator: Generators = None, **sampling) -> torch.Tensor:
        return self.mar.sample(self.conditioner(features), lr_tokens=lr_tokens,
                               generator=generator, **sampling)
