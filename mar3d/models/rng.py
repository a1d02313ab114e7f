"""Random draws from one ``torch.Generator`` or from one generator per batch item.

Batched sampling is batch-invariant when every item draws from its own generator, in the
same order and with the same shapes as when it is sampled alone: then an item's result
does not depend on which batch it landed in. The sampler keeps its rows item-major
(item 0's rows, then item 1's, ...), so a draw of leading size N with G generators is G
draws of N / G rows, one per generator, stacked in item order. With one generator (or
None) a draw is the plain joint draw, as before.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def is_per_item(generator: Generators) -> bool:
    return generator is not None and not isinstance(generator, torch.Generator)


def draw(fn: Callable[..., torch.Tensor], shape: tuple[int, ...], generator: Generators,
         device: torch.device | str | None) -> torch.Tensor:
    """``fn`` (``torch.rand`` / ``torch.randn``) of ``shape``, drawn on each generator's own
    device (a CPU generator gives the same numbers whatever device the model is on)."""
    if not is_per_item(generator):
        return fn(shape, generator=generator, device=generator.device if generator is not None else device)
    gens = list(generator)
    if not gens or shape[0] % len(gens):
        raise ValueError(f"{len(gens)} per-item generators cannot split a draw of {shape[0]} rows")
    rows = (shape[0] // len(gens), *shape[1:])
    return torch.cat([fn(rows, generator=g, device=g.device).to(device) for g in gens])


def check_per_item(generator: Generators, batch: int) -> None:
    if is_per_item(generator) and len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}: give one per item")
