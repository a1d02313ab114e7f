"""Schedules of masked autoregressive generation (MAR, Li et al. 2024; MAR-3D).

Pure functions, no model state:

* ``sample_mask_ratio``: training mask ratio, truncated normal (loc 1, scale 0.25) on [0.7, 1].
  High ratios dominate because generation starts from a fully masked sequence.
* ``cosine_mask_schedule``: how many tokens each inference step reveals. The fraction still
  masked after step k is cos(pi/2 * (k+1)/n), so early steps reveal few tokens (when the
  sequence is nearly empty and predictions are least certain) and late steps many.
* ``guidance_ramp``: classifier-free guidance grows linearly with the fraction generated, because
  strong guidance on the first, context-free tokens hurts diversity more than it helps.
"""
from __future__ import annotations

import math

import torch

from mar3d.models.rng import Generators, draw


def cosine_mask_schedule(seq_len: int, num_steps: int) -> list[int]:
    """Tokens revealed at each of ``num_steps`` steps; sums to ``seq_len``.

    Follows MAR: after step k, ``floor(seq_len * cos(pi/2 * (k+1)/num_steps))`` tokens stay
    masked, clamped so every step reveals at least one token and at least one token is left
    for the final step, which reveals everything that remains.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 1 <= num_steps <= seq_len:
        raise ValueError(f"num_steps must be in [1, seq_len={seq_len}] so every step "
                         f"reveals a token, got {num_steps}")
    counts = []
    masked = seq_len
    for step in range(num_steps):
        if step == num_steps - 1:
            masked_after = 0
        else:
            target = math.floor(seq_len * math.cos(math.pi / 2.0 * (step + 1) / num_steps))
            # Leave at least one token per remaining step so no step is empty.
            remaining_steps = num_steps - 1 - step
            masked_after = max(remaining_steps, min(masked - 1, target))
        counts.append(masked - masked_after)
        masked = masked_after
    return counts


def guidance_ramp(guidance_scale: float, generated: int, seq_len: int) -> float:
    """Guidance scale ``1 + (guidance_scale - 1) * generated / seq_len`` (linear ramp).

    ``generated`` counts the tokens known once the current step is done (MAR uses the
    count after the step, so the last step gets exactly ``guidance_scale``).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 0 <= generated <= seq_len:
        raise ValueError(f"generated must be in [0, {seq_len}], got {generated}")
    return 1.0 + (guidance_scale - 1.0) * generated / seq_len


def sample_mask_ratio(num: int, generator: torch.Generator | None = None, *,
                      low: float = 0.7, high: float = 1.0, loc: float = 1.0,
                      scale: float = 0.25) -> torch.Tensor:
    """``num`` draws of a normal(loc, scale) truncated to [low, high] (inverse-CDF sampling).

    Inverse CDF keeps it exact and reproducible with a torch generator (no rejection loop).
    """
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    lo_cdf = torch.special.ndtr(torch.tensor((low - loc) / scale, dtype=torch.float64))
    hi_cdf = torch.special.ndtr(torch.tensor((high - loc) / scale, dtype=torch.float64))
    u = torch.rand(num, generator=generator, dtype=torch.float64)
    ratio = loc + scale * torch.special.ndtri(lo_cdf + u * (hi_cdf - lo_cdf))
    return ratio.clamp(low, high).float()


def random_orders(batch: int, seq_len: int, generator: Generators = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """One random permutation of token indices per sample: [batch, seq_len] int64.
    With a list of generators, sample i's order comes from generator i alone."""
    return draw(torch.rand, (batch, seq_len), generator, device).argsort(dim=1).to(device)


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Bool mask [B, T] that is True at the first ``num_masked`` positions of each order."""
    batch, seq_len = orders.shape
    if not 0 <= num_masked <= seq_len:
        raise ValueError(f"num_masked must be in [0, {seq_len}], got {num_masked}")
    mask = torch.zeros(batch, seq_len, dtype=torch.bool, device=orders.device)
    mask.scatter_(1, orders[:, :num_masked], True)
    return mask
