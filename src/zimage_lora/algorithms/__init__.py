"""Adapter math as small pure functions, one module per algorithm.

Each algorithm module exposes the same four functions, all free of module wrapping and file formats:

- `delta_shape(shapes) -> (out, in)`: the delta's shape from the tensor shapes alone, raising
  `ValueError` with what is inconsistent (used to validate before any tensor is read).
- `rank(shapes) -> int | None`: the rank that alpha is divided by (None: no rank, scale 1).
- `delta(tensors) -> Tensor`: the full fp32 weight delta, unscaled.
- `bypass(x, tensors) -> Tensor`: `x @ delta.T` computed without building the delta where that is cheaper.
- `row_parts(tensors) -> parts` and `delta_block(parts, lo, hi)`: rows [lo, hi) of the fp32 delta from
  parts prepared once, so merges work a block of rows at a time without the full delta in memory.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import full, loha, lokr, lora
from .dora import dora_row_factor

_BY_NAME: dict[str, ModuleType] = {"lora": lora, "lokr": lokr, "loha": loha, "full": full}


def get(algorithm: str) -> ModuleType:
    try:
        return _BY_NAME[algorithm]
    except KeyError:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {sorted(_BY_NAME)}") from None


def delta_shape(algorithm: str, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    return get(algorithm).delta_shape(shapes)


def rank(algorithm: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    return get(algorithm).rank(shapes)


def delta(algorithm: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full fp32 delta (out, in), unscaled."""
    return get(algorithm).delta(tensors)


def bypass(algorithm: str, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """`x @ delta.T` in x's dtype, unscaled."""
    return get(algorithm).bypass(x, tensors)


__all__ = ["get", "delta_shape", "rank", "delta", "bypass", "dora_row_factor"]
