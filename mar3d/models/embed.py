"""Fourier positional embedding of 3D points (NeRF / 3DShape2VecSet / CraftsMan style).

With ``num_freqs`` = 8 and the input included, a point ``p`` becomes
``[p, sin(2^0 pi p), ..., sin(2^7 pi p), cos(2^0 pi p), ..., cos(2^7 pi p)]``:
3 + 3*2*8 = 51 dimensions. Surface points additionally carry their unit normal, giving
54 dimensions, which one Linear layer (shared by all pyramid levels) maps to the width.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class FourierEmbedder(nn.Module):
    def __init__(self, num_freqs: int = 8, include_input: bool = True, input_dim: int = 3):
        super().__init__()
        if num_freqs < 0:
            raise ValueError(f"num_freqs must be >= 0, got {num_freqs}")
        if num_freqs == 0 and not include_input:
            raise ValueError("a Fourier embedding with no frequencies must include the input")
        # Frequencies 2^0..2^(L-1) times pi: the coarsest period (2) spans the [-1, 1] cube.
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs, dtype=torch.float32),
                             persistent=False)
        self.include_input = include_input
        self.input_dim = input_dim
        self.out_dim = input_dim * (2 * num_freqs + int(include_input))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[..., None] * self.freqs.to(x.dtype)).flatten(-2)  # [..., D*L]
        parts = [x] if self.include_input else []
        parts += [angles.sin(), angles.cos()]
        return torch.cat(parts, dim=-1)


class PointEmbed(nn.Module):
    """xyz (+ optional normals) -> Fourier features (+ normals) -> Linear to ``width``."""

    def __init__(self, width: int, num_freqs: int = 8, include_input: bool = True,
                 with_normals: bool = True):
        super().__init__()
        self.fourier = FourierEmbedder(num_freqs, include_input)
        self.with_normals = with_normals
        self.proj = nn.Linear(self.fourier.out_dim + (3 if with_normals else 0), width)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        expected = 6 if self.with_normals else 3
        if points.shape[-1] != expected:
            raise ValueError(f"PointEmbed expects [..., {expected}] "
                             f"({'xyz + normal' if self.with_normals else 'xyz'}), got {tuple(points.shape)}")
        feats = self.fourier(points[..., :3])
        if self.with_normals:
            feats = torch.cat([feats, points[..., 3:6]], dim=-1)
        return self.proj(feats)
