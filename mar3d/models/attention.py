"""Transformer building blocks shared by the shape VAE and the MAR models.

Every attention goes through ``torch.nn.functional.scaled_dot_product_attention`` so
PyTorch picks the flash / memory-efficient kernels on GPU (and the math kernel on CPU)
without any model code knowing which one runs.

Blocks are pre-LayerNorm (GPT-2 / ViT / LTH14-mar style): ``x = x + f(LN(x))``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D]"""
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _check_heads(dim: int, heads: int) -> None:
    if heads < 1 or dim % heads != 0:
        raise ValueError(f"width {dim} must be divisible by the number of heads {heads}")


class Attention(nn.Module):
    """Multi-head self-attention."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        _check_heads(dim, heads)
        self.heads = heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge_heads(out)))


@dataclass(frozen=True)
class KVSelect:
    """Adaptive KV selection (FlashVDM) for a cross-attention from many spatially
    ordered queries into few context tokens: the queries are cut into blocks of
    ``block`` consecutive queries; ``score_queries`` evenly spaced queries of a block
    score every context token (softmax attention probabilities, averaged over those
    queries *and over the heads*, so one token set serves all heads of a block and the
    K/V gather is shared); the block then attends to its ``top_k`` best tokens only.
    Exact when ``top_k`` >= the number of tokens (softmax does not depend on order)."""
    top_k: int
    block: int = 1024
    score_queries: int = 32

    def __post_init__(self):
        for name in ("top_k", "block", "score_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"KVSelect.{name} must be >= 1, got {getattr(self, name)}")
        if self.score_queries > self.block:
            raise ValueError(f"KVSelect.score_queries ({self.score_queries}) must be <= block ({self.block})")


# Bit b of an 8-bit integer moved to bit 3b: one axis of a 24-bit Morton code.
_SPREAD = [sum(((i >> b) & 1) << (3 * b) for b in range(8)) for i in range(256)]


def morton_order(points: torch.Tensor) -> torch.Tensor:
    """Permutation [B, M] that sorts points [B, M, 3] along a Z-order curve (256 cells
    per axis over each batch item's bounding box, ties in input order): consecutive runs
    of the sorted points are spatially compact, so a block shares its relevant tokens."""
    lo = points.amin(1, keepdim=True)
    extent = (points.amax(1, keepdim=True) - lo).amax(-1, keepdim=True).clamp(min=1e-12)
    cells = ((points - lo) * (255.0 / extent)).int().clamp_(0, 255)
    spread = torch.tensor(_SPREAD, dtype=torch.int32, device=points.device)[cells]
    code = (spread[..., 0] << 2) | (spread[..., 1] << 1) | spread[..., 2]
    return code.argsort(dim=-1, stable=True)


def block_order(points: torch.Tensor, block: int) -> torch.Tensor:
    """Morton order padded to a multiple of ``block`` by repeating the last point:
    [B, ceil(M / block) * block]; its first M entries are a permutation of 0..M-1."""
    order = morton_order(points)
    pad = -order.shape[1] % block
    return torch.cat([order, order[:, -1:].expand(-1, pad)], 1) if pad else order


def select_tokens(blocks: torch.Tensor, k: torch.Tensor, select: KVSelect) -> torch.Tensor:
    """Indices [B, nb, top_k] of the context tokens each query block keeps: blocks
    [B, H, nb, block, D], k [B, H, T, D]."""
    d = blocks.shape[-1]
    scorers = torch.linspace(0, select.block - 1, select.score_queries, device=blocks.device).round().long()
    probs = torch.softmax((blocks[:, :, :, scorers] * d ** -0.5) @ k.unsqueeze(2).transpose(-1, -2), dim=-1)
    return probs.mean(dim=(1, 3)).topk(min(select.top_k, k.shape[2]), dim=-1).indices


def topk_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, select: KVSelect) -> torch.Tensor:
    """q [B, H, N, D] (N a multiple of ``select.block``), k/v [B, H, T, D] -> [B, H, N, D],
    each block of queries attending only to its selected tokens (see :class:`KVSelect`)."""
    b, h, n, d = q.shape
    if n % select.block:
        raise ValueError(f"{n} queries are not a multiple of the KV-selection block {select.block}")
    nb = n // select.block
    blocks = q.view(b, h, nb, select.block, d)
    index = select_tokens(blocks, k, select)[:, None, :, :, None].expand(-1, h, -1, -1, d)

    def gather(x):
        return torch.gather(x.unsqueeze(2).expand(-1, -1, nb, -1, -1), 3, index)

    # Four dimensions with (head, block) merged: the fused CPU/GPU kernels take 4-D
    # inputs only (5-D ones fall back to the unfused math path).
    out = F.scaled_dot_product_attention(*(x.reshape(b, h * nb, -1, d) for x in (blocks, gather(k), gather(v))))
    return out.view(b, h, n, d)


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (queries) into ``context`` (keys/values)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        _check_heads(dim, heads)
        self.heads = heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_select: KVSelect | None = None) -> torch.Tensor:
        q = _split_heads(self.q(x), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.kv(context).chunk(2, dim=-1))
        if kv_select is not None:
            if attn_mask is not None:
                raise ValueError("KV selection does not take an attention mask")
            out = topk_block_attention(q, k, v, kv_select)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(_merge_heads(out)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block: self-attention then MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class CrossBlock(nn.Module):
    """Pre-LN cross-attention block: queries attend into a (separately normalised)
    context, then an MLP; residuals on the query stream only."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim or dim)
        self.attn = CrossAttention(dim, heads, context_dim=context_dim, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_select: KVSelect | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_q(x), self.norm_context(context), attn_mask=attn_mask, kv_select=kv_select)
        return x + self.mlp(self.norm2(x))
