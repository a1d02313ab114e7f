"""Shape VAE: MAR-3D's Pyramid VAE and the single-level 3DShape2VecSet baseline.

A shape is given as a *pyramid* of surface point clouds with normals,
``surfaces[k]`` of shape [B, n_k, 6] for k = 0..K-1, level 0 the finest (dataset
default 16384 / 4096 / 1024 points). It is encoded into T latent tokens of C channels
(a "vecset") and decoded into an occupancy field queried at arbitrary points.

Encoder (``kind="pyramid"``, MAR-3D)::

    X_k  = Linear(concat(Fourier(xyz_k), normal_k))           # one projection, all levels
    S    = query tokens [B, T, D]                             # learnable or FPS, see below
    H    = sum_k CrossBlock_k(S, X_k)                         # one cross-attention block per level
    H    = LN(SelfAttn^L_enc(H))
    mean, logvar = Linear(H).chunk(2)                         # logvar clamped to [-30, 20]

``kind="standard"`` (3DShape2VecSet, the "w/o Pyramid VAE" ablation) is the same
with a single cross-attention block into level 0 only.

Decoder::

    kv     = SelfAttn^L_dec(Linear(z))                        # computed once per shape
    logit  = Linear(LN(CrossBlock(Linear(Fourier(xyz_query)), kv)))   # per query point

Loss: BCE on occupancy labels (1 = inside) + ``kl_weight`` * KL (default 1e-3). KL is
the mean over tokens and channels of the per-element Gaussian KL (the
3DShape2VecSet / CraftsMan convention), averaged over the batch.

**LR and HR latents from one VAE** (follows the authors' training code). HR latents
(``hr_tokens``, paper 1024) encode pyramid levels (0, 1, ..., K-1). LR latents
(``lr_tokens``, paper 256) encode the pyramid *shifted one level down*:
(1, ..., K-1, K), where the extra level K is a subset of n_{K-1}/4 points of level
K-1 made on the fly (random while training, every 4th point in eval mode so that
evaluation is deterministic). The same K cross-attention blocks serve both, so the
k-th block always sees "the k-th finest level available", and a single decoder is
trained on both token counts (the training loop picks ``level`` per step).
The standard VAE encodes level 0 for both token counts (there is no pyramid to shift).

Query tokens (``query_mode``):
  * ``"fps"`` (default, as in the authors' code and 3DShape2VecSet): farthest point
    sampling of the finest level of the (HR or LR) pyramid -- level 0 for HR, level 1
    for LR -- embedded with the same point embedding; random start point while
    training, a canonical start (the extreme point along a fixed direction) in eval
    mode, so a shape's tokens come in the same order every time it is encoded.
  * ``"learnable"`` (the paper's figure): separate learnable token sets for the HR and
    the LR token count.
  * ``"random"``: a random subset of the finest level instead of FPS (cheaper; strided
    deterministic subset in eval mode).

Near-surface weighting: when a batch carries ``near_mask`` [B, M] (True for
near-surface supervision points), each near point's BCE counts ``near_weight`` times a
volume point's (weighted mean). The default 1.0 gives the plain mean over all
supervision points, which is what the MAR-3D/CraftsMan code does (1/4 near, 3/4
volume in one BCE); 3DShape2VecSet used 0.1 for its near-surface term.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import fpsample
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mar3d.models.attention import Block, CrossBlock, KVSelect, block_order
from mar3d.models.embed import PointEmbed

Level = Literal["hr", "lr"]


@dataclass
class VAEConfig:
    kind: Literal["pyramid", "standard"] = "pyramid"
    width: int = 768
    heads: int = 12
    enc_layers: int = 8
    dec_layers: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    latent_channels: int = 64
    num_levels: int = 3
    num_freqs: int = 8
    query_mode: Literal["fps", "learnable", "random"] = "fps"
    hr_tokens: int = 1024
    lr_tokens: int = 256
    kl_weight: float = 1e-3
    near_weight: float = 1.0
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    # Initial posterior log-variance (bias of its output layer). 0 (PyTorch's default, the
    # authors' code) starts every latent as noise of the prior's size, which the decoder
    # must first learn to see through; a negative value starts from nearly deterministic
    # latents and the KL term lets the variance grow (-4: VAE IoU after 300 tiny CPU
    # steps 0.47 -> 0.62, README).
    logvar_init: float = 0.0
    dropout: float = 0.0

    def validate(self) -> None:
        if self.kind not in ("pyramid", "standard"):
            raise ValueError(f"VAEConfig.kind must be 'pyramid' or 'standard', got {self.kind!r}")
        if self.query_mode not in ("fps", "learnable", "random"):
            raise ValueError(f"VAEConfig.query_mode must be 'fps', 'learnable' or 'random', got {self.query_mode!r}")
        for name in ("width", "heads", "latent_channels", "hr_tokens", "lr_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"VAEConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if self.enc_layers < 0 or self.dec_layers < 0:
            raise ValueError("VAEConfig.enc_layers and dec_layers must be >= 0")
        if self.mlp_ratio <= 0:
            raise ValueError(f"VAEConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.kind == "pyramid" and self.num_levels < 2:
            raise ValueError("a pyramid VAE needs num_levels >= 2 (LR latents use levels 1..K)")
        if self.num_levels < 1:
            raise ValueError(f"VAEConfig.num_levels must be >= 1, got {self.num_levels}")
        if self.num_freqs < 0:
            raise ValueError(f"VAEConfig.num_freqs must be >= 0, got {self.num_freqs}")
        if self.kl_weight < 0 or self.near_weight < 0:
            raise ValueError("VAEConfig.kl_weight and near_weight must be >= 0")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(f"VAEConfig.logvar_min ({self.logvar_min}) must be < logvar_max ({self.logvar_max})")
        if not self.logvar_min <= self.logvar_init <= self.logvar_max:
            raise ValueError(f"VAEConfig.logvar_init ({self.logvar_init}) must be within "
                             f"[logvar_min, logvar_max] = [{self.logvar_min}, {self.logvar_max}]")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout}")


class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)) per token and channel."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn_like(self.mean)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)), mean over tokens and channels -> [B]."""
        var = torch.exp(self.logvar)
        return 0.5 * (self.mean.pow(2) + var - 1.0 - self.logvar).mean(dim=tuple(range(1, self.mean.ndim)))


# Direction whose extreme surface point starts a "canonical" FPS (not axis-aligned, so
# flat faces of boxes do not make the start point ambiguous).
CANONICAL_DIRECTION = (0.2672612419124244, 0.5345224838248488, 0.8017837257372732)


FPSBackend = Literal["auto", "torch", "fpsample"]


@torch.no_grad()
def farthest_point_sample(xyz: torch.Tensor, num_samples: int,
                          start: Literal["first", "random", "canonical"] = "first",
                          backend: FPSBackend = "auto") -> torch.Tensor:
    """Batched iterative farthest point sampling. xyz [B, N, 3] -> indices [B, num_samples].

    ``start``: the first point is index 0, a random point, or ``"canonical"``: the point
    farthest along :data:`CANONICAL_DIRECTION`. The canonical start makes the sampling
    order a function of the shape rather than of how its points happen to be listed, so
    the i-th query (and latent token) lands on the same part of an object every time it
    is encoded: what a model generating tokens position by position (MAR) needs.

    ``backend``: ``"torch"`` runs one batched tensor step per sampled point on the
    tensors' device; ``"fpsample"`` runs the exact (vanilla) FPS of the compiled fpsample
    library shape by shape on the CPU, 3-9x faster than the loop there
    (``benchmarks/fps.py``). ``"auto"``: fpsample for CPU tensors, the torch loop on
    other devices (a GPU runs the whole batch per step; ``benchmarks/fps.py --device
    cuda`` measures both there). Both give the same indices: the same start point (chosen
    here, from the torch RNG for ``"random"``), then the first of equally far points."""
    n = xyz.shape[1]
    if num_samples > n:
        raise ValueError(f"cannot farthest-point-sample {num_samples} points from {n}")
    if backend not in ("auto", "torch", "fpsample"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'fpsample', got {backend!r}")
    xyz = xyz.float()
    first = _fps_start(xyz, start)
    if backend == "auto":
        backend = "fpsample" if xyz.device.type == "cpu" else "torch"
    if backend == "fpsample" and num_samples > 0:
        return _fps_fpsample(xyz, num_samples, first)
    return _fps_torch(xyz, num_samples, first)


def _fps_start(xyz: torch.Tensor, start: str) -> torch.Tensor:
    """The first sampled index of each shape [B]."""
    b, n, _ = xyz.shape
    if start == "random":
        return torch.randint(0, n, (b,), device=xyz.device)
    if start == "canonical":
        return (xyz @ xyz.new_tensor(CANONICAL_DIRECTION)).argmax(-1)
    if start == "first":
        return torch.zeros(b, dtype=torch.long, device=xyz.device)
    raise ValueError(f"start must be 'first', 'random' or 'canonical', got {start!r}")


def _fps_torch(xyz: torch.Tensor, num_samples: int, farthest: torch.Tensor) -> torch.Tensor:
    b, n, _ = xyz.shape
    indices = torch.empty(b, num_samples, dtype=torch.long, device=xyz.device)
    min_dist = torch.full((b, n), float("inf"), device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(num_samples):
        indices[:, i] = farthest
        centre = xyz[rows, farthest].unsqueeze(1)  # [B, 1, 3]
        min_dist = torch.minimum(min_dist, (xyz - centre).pow(2).sum(-1))
        farthest = min_dist.argmax(-1)
    return indices


def _fps_fpsample(xyz: torch.Tensor, num_samples: int, first: torch.Tensor) -> torch.Tensor:
    # fps_sampling, not fpsample's bucket (kd-tree) variants: in fpsample (0.3.3 to
    # 1.0.2) those do not start at start_idx, which would break the canonical token order.
    # fps_sampling takes the *last* of equally far points, torch.argmax the first: the
    # points go in reversed, so ties resolve as in the torch loop.
    reversed_points = xyz.detach().flip(1).contiguous().cpu().numpy()
    n = reversed_points.shape[1]
    indices = torch.empty(len(reversed_points), num_samples, dtype=torch.long)
    for row, cloud, s in zip(indices, reversed_points, first.tolist()):
        picked = fpsample.fps_sampling(cloud, num_samples, start_idx=n - 1 - s)
        row.copy_(n - 1 - torch.from_numpy(picked.astype(np.int64)))
    return indices.to(xyz.device)


def gather_points(points: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """points [B, N, C], indices [B, T] -> [B, T, C]"""
    return torch.gather(points, 1, indices.unsqueeze(-1).expand(-1, -1, points.shape[-1]))


def subset_indices(batch: int, n: int, k: int, training: bool, device) -> torch.Tensor:
    """k of n indices per sample: random while training, evenly strided in eval."""
    if k > n:
        raise ValueError(f"cannot take {k} points from {n}")
    if training:
        return torch.rand(batch, n, device=device).argsort(dim=-1)[:, :k]
    strided = torch.linspace(0, n - 1, k, device=device).round().long()
    return strided.unsqueeze(0).expand(batch, -1)


def _check_surfaces(surfaces: list[torch.Tensor]) -> None:
    if not surfaces:
        raise ValueError("no surface levels given")
    b = surfaces[0].shape[0]
    for k, s in enumerate(surfaces):
        if s.ndim != 3 or s.shape[-1] != 6:
            raise ValueError(f"surface level {k} must be [B, n, 6] (xyz + normal), got {tuple(s.shape)}")
        if s.shape[0] != b:
            raise ValueError(f"surface level {k} has batch {s.shape[0]}, level 0 has {b}")


class ShapeEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.embed = PointEmbed(d, cfg.num_freqs, include_input=True, with_normals=True)
        num_cross = cfg.num_levels if cfg.kind == "pyramid" else 1
        self.cross_blocks = nn.ModuleList(
            CrossBlock(d, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.dropout)
            for _ in range(num_cross))
        if cfg.query_mode == "learnable":
            self.queries = nn.ParameterDict({
                "hr": nn.Parameter(torch.randn(cfg.hr_tokens, d) * 0.02),
                "lr": nn.Parameter(torch.randn(cfg.lr_tokens, d) * 0.02),
            })
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.dropout)
            for _ in range(cfg.enc_layers))
        self.norm = nn.LayerNorm(d)
        self.to_moments = nn.Linear(d, 2 * cfg.latent_channels)
        with torch.no_grad():
            self.to_moments.bias[cfg.latent_channels:] = cfg.logvar_init

    def num_tokens(self, level: Level) -> int:
        if level not in ("hr", "lr"):
            raise ValueError(f"level must be 'hr' or 'lr', got {level!r}")
        return self.cfg.hr_tokens if level == "hr" else self.cfg.lr_tokens

    def input_levels(self, surfaces: list[torch.Tensor], level: Level) -> list[torch.Tensor]:
        """The point clouds the cross-attention blocks see, finest first (see module doc)."""
        cfg = self.cfg
        if cfg.kind == "standard":
            return [surfaces[0]]
        if len(surfaces) < cfg.num_levels:
            raise ValueError(f"pyramid VAE needs {cfg.num_levels} surface levels, got {len(surfaces)}")
        surfaces = list(surfaces[:cfg.num_levels])
        if level == "hr":
            return surfaces
        coarsest = surfaces[-1]
        b, n, _ = coarsest.shape
        if n < 4:
            raise ValueError(f"coarsest surface level has {n} points; LR needs at least 4 to subsample")
        extra = gather_points(coarsest, subset_indices(b, n, n // 4, self.training, coarsest.device))
        return surfaces[1:] + [extra]

    def make_queries(self, finest: torch.Tensor, level: Level) -> torch.Tensor:
        cfg = self.cfg
        t = self.num_tokens(level)
        b, n, _ = finest.shape
        if cfg.query_mode == "learnable":
            return self.queries[level].unsqueeze(0).expand(b, -1, -1)
        if t > n:
            raise ValueError(f"{cfg.query_mode} queries: {level} needs {t} tokens but its finest "
                             f"level has only {n} points")
        if cfg.query_mode == "fps":
            # Random start while training (the decoder is order-free, the encoder sees
            # every ordering); canonical in eval mode, where MAR targets are encoded.
            idx = farthest_point_sample(finest[..., :3], t, start="random" if self.training else "canonical")
        else:
            idx = subset_indices(b, n, t, self.training, finest.device)
        return self.embed(gather_points(finest, idx))

    def forward(self, surfaces: list[torch.Tensor], level: Level = "hr") -> DiagonalGaussian:
        _check_surfaces(surfaces)
        self.num_tokens(level)  # validates ``level``
        levels = self.input_levels(surfaces, level)
        queries = self.make_queries(levels[0], level)
        h = sum(block(queries, self.embed(x)) for block, x in zip(self.cross_blocks, levels))
        for block in self.blocks:
            h = block(h)
        mean, logvar = self.to_moments(self.norm(h)).chunk(2, dim=-1)
        logvar = logvar.clamp(self.cfg.logvar_min, self.cfg.logvar_max)
        return DiagonalGaussian(mean, logvar)


class OccupancyDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        d = cfg.width
        self.post_kl = nn.Linear(cfg.latent_channels, d)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.dropout)
            for _ in range(cfg.dec_layers))
        self.query_embed = PointEmbed(d, cfg.num_freqs, include_input=True, with_normals=False)
        self.cross = CrossBlock(d, cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.dropout)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def latents_to_kv(self, z: torch.Tensor) -> torch.Tensor:
        h = self.post_kl(z)
        for block in self.blocks:
            h = block(h)
        return h

    def query(self, kv: torch.Tensor, points: torch.Tensor, kv_select: KVSelect | None = None) -> torch.Tensor:
        if points.ndim != 3 or points.shape[-1] != 3:
            raise ValueError(f"query points must be [B, M, 3], got {tuple(points.shape)}")
        if points.shape[0] != kv.shape[0]:
            raise ValueError(f"query batch {points.shape[0]} does not match latent batch {kv.shape[0]}")
        points = points.to(kv.dtype)
        if kv_select is None:
            return self._logits(kv, points)
        # Blocks of spatially close points (Morton order) share their selected tokens;
        # the padding repeats a point and is dropped again by the scatter.
        m = points.shape[1]
        order = block_order(points, kv_select.block)
        ordered = torch.gather(points, 1, order.unsqueeze(-1).expand(-1, -1, 3))
        logits = self._logits(kv, ordered, kv_select)
        return torch.empty_like(logits[:, :m]).scatter_(1, order[:, :m], logits[:, :m])

    def _logits(self, kv: torch.Tensor, points: torch.Tensor, kv_select: KVSelect | None = None) -> torch.Tensor:
        h = self.cross(self.query_embed(points), kv, kv_select=kv_select)
        return self.head(self.norm(h)).squeeze(-1)


def surfaces_from_batch(batch: dict, num_levels: int) -> list[torch.Tensor]:
    missing = [f"surface_{k}" for k in range(num_levels) if f"surface_{k}" not in batch]
    if missing:
        raise KeyError(f"batch lacks {missing}; it has {sorted(batch)}")
    return [batch[f"surface_{k}"] for k in range(num_levels)]


def occupancy_iou(logits, labels) -> torch.Tensor:
    """Mean over the batch (leading dims) of IoU(logit > 0, label > 0.5) over the last
    dim; an empty union counts as 1. Tensors or arrays (training and evaluation share it)."""
    # Arrays read from Arrow buffers are read-only; torch warns about wrapping them.
    logits, labels = (torch.as_tensor(np.array(x) if isinstance(x, np.ndarray) else x)
                      for x in (logits, labels))
    if logits.shape != labels.shape:
        raise ValueError(f"occupancy logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    pred = logits > 0
    gt = labels > 0.5
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean()


@torch.no_grad()
def latent_sums(vae: "ShapeVAE", surfaces: list[torch.Tensor], level: Level) -> torch.Tensor:
    """Sufficient statistics of one batch's latents at ``level``, float64 [5]:
    (count, sum and sum of squares of posterior means, sum and sum of squares of posterior
    samples) -- summable across batches and ranks, see :func:`latent_stats_from_sums`."""
    posterior = vae.encode_posterior(surfaces, level)
    mean = posterior.mean.double()
    sample = posterior.sample().double()
    return torch.stack([torch.tensor(float(mean.numel()), dtype=torch.float64, device=mean.device),
                        mean.sum(), mean.pow(2).sum(), sample.sum(), sample.pow(2).sum()])


def latent_stats_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """``shift`` (mean of the posterior means) and the standard deviations of posterior
    means (``std_mean``) and samples (``std_sample``) around it, from :func:`latent_sums`."""
    n, s_mean, sq_mean, s_sample, sq_sample = (float(v) for v in sums)
    if n <= 0:
        raise ValueError("no latents were measured")
    shift = s_mean / n

    def std(total: float, squares: float) -> float:
        # E[(x - shift)^2] = E[x^2] - 2 shift E[x] + shift^2
        var = squares / n - 2 * shift * total / n + shift ** 2
        return max(var, 1e-12) ** 0.5

    return {"shift": shift, "std_mean": std(s_mean, sq_mean), "std_sample": std(s_sample, sq_sample)}


class ShapeVAE(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = ShapeEncoder(cfg)
        self.decoder = OccupancyDecoder(cfg)

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    def num_tokens(self, level: Level) -> int:
        return self.encoder.num_tokens(level)

    def required_levels(self) -> int:
        return self.cfg.num_levels if self.cfg.kind == "pyramid" else 1

    def encode_posterior(self, surfaces: list[torch.Tensor], level: Level = "hr") -> DiagonalGaussian:
        return self.encoder(surfaces, level)

    def encode(self, surfaces: list[torch.Tensor], level: Level = "hr", sample: bool = True) -> torch.Tensor:
        """Surface pyramid -> latents [B, T, C] (T = hr_tokens or lr_tokens)."""
        posterior = self.encode_posterior(surfaces, level)
        return posterior.sample() if sample else posterior.mode()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, T, C] -> key/value tokens [B, T, width] for :meth:`query`."""
        if z.ndim != 3 or z.shape[-1] != self.cfg.latent_channels:
            raise ValueError(f"latents must be [B, T, {self.cfg.latent_channels}], got {tuple(z.shape)}")
        return self.decoder.latents_to_kv(z)

    def query(self, kv: torch.Tensor, points: torch.Tensor, kv_select: KVSelect | None = None) -> torch.Tensor:
        """Occupancy logits [B, M] (> 0 inside) at ``points`` [B, M, 3]; with ``kv_select``
        each block of nearby points attends only to its top-k latent tokens (approximate,
        faster decoding with many tokens, see :class:`mar3d.models.attention.KVSelect`)."""
        return self.decoder.query(kv, points, kv_select)

    def forward(self, batch: dict, level: Level = "hr", sample: bool = True) -> dict:
        surfaces = surfaces_from_batch(batch, self.required_levels())
        points, labels = batch["occ_points"], batch["occ_labels"]
        if labels.shape != points.shape[:2]:
            raise ValueError(f"occ_labels {tuple(labels.shape)} does not match occ_points {tuple(points.shape)}")
        posterior = self.encode_posterior(surfaces, level)
        z = posterior.sample() if sample else posterior.mode()
        logits = self.query(self.decode(z), points)
        labels = labels.to(logits.dtype)
        per_point = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        near_mask = batch.get("near_mask")
        if near_mask is not None:
            weights = torch.where(near_mask.bool(), self.cfg.near_weight, 1.0).to(per_point.dtype)
            bce = (per_point * weights).sum() / weights.sum().clamp(min=1e-8)
        else:
            bce = per_point.mean()
        kl = posterior.kl().mean()
        loss = bce + self.cfg.kl_weight * kl
        return {"loss": loss, "bce": bce, "kl": kl, "logits": logits,
                "iou": occupancy_iou(logits.detach(), labels)}
