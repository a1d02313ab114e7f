"""Reductions over the training workers (no-ops when torch.distributed is not set up,
e.g. one process in a unit test)."""
from __future__ import annotations

from typing import Any


def all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_means(sums: dict[str, float], counts: dict[str, float], device) -> dict[str, float]:
    """Means over all ranks of per-key sums/counts (keys must be the same on every rank)."""
    keys = sorted(sums)
    if not keys:
        return {}
    t = all_reduce_sum([sums[k] for k in keys] + [counts[k] for k in keys], device)
    n = len(keys)
    return {k: t[i] / t[n + i] for i, k in enumerate(keys) if t[n + i] > 0}


def all_reduce_means_any_keys(sums: dict[str, float], counts: dict[str, float], device) -> dict[str, float]:
    """Like all_reduce_means, but a rank without some keys (e.g. more workers than
    evaluation samples) contributes zeros: first agree on the key set, then reduce."""
    import torch.distributed as dist

    keys = set(sums)
    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(keys))
        keys = set().union(*map(set, gathered))
    for k in keys:
        sums.setdefault(k, 0.0)
        counts.setdefault(k, 0.0)
    return all_reduce_means(sums, counts, device)
