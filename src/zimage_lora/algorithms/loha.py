"""LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; tucker cores t1 / t2 optional.

The Hadamard product has no cheap factored form: dynamic mode caches the dense delta (`base.DENSE`).
"""

from __future__ import annotations

import torch

from ._shapes import as_matrix, matrix, product, product_shape
from .base import Algorithm, Shapes, Tensors


def _half_shape(shapes: Shapes, i: int) -> tuple[int, int]:
    return product_shape(shapes, f"w{i}_a", f"w{i}_b", f"t{i}")


def delta_shape(shapes: Shapes) -> tuple[int, int]:
    first, second = _half_shape(shapes, 1), _half_shape(shapes, 2)
    if first != second:
        raise ValueError(f"LoHa halves disagree: w1 gives {list(first)}, w2 gives {list(second)}")
    return first


def rank(shapes: Shapes) -> int | None:
    return matrix(shapes, "w1_b")[0]


def _half(tensors: Tensors, i: int) -> torch.Tensor:
    return product(tensors, f"w{i}_a", f"w{i}_b", f"t{i}", torch.float32)


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    return _half(tensors, 1) * _half(tensors, 2)


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    return x @ delta(tensors).to(x.dtype).T


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    """Each half as (left, right) with its tucker core folded into the left factor."""
    parts = {}
    for i in (1, 2):
        a = as_matrix(tensors[f"w{i}_a"]).float()
        if f"t{i}" in tensors:
            a = (a.T @ as_matrix(tensors[f"t{i}"]).float()).contiguous()
        parts[f"a{i}"] = a
        parts[f"b{i}"] = as_matrix(tensors[f"w{i}_b"]).float()
    return parts


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    return (parts["a1"][lo:hi] @ parts["b1"]) * (parts["a2"][lo:hi] @ parts["b2"])


def dynamic_numel(shapes: Shapes) -> int:
    n_out, n_in = delta_shape(shapes)
    return n_out * n_in  # the cached dense delta


def describe(shapes: Shapes) -> str:
    (o, i), r = delta_shape(shapes), rank(shapes)
    tucker = ", tucker" if "t1" in shapes or "t2" in shapes else ""
    return f"hadamard of two {o}x{i} products, rank {r}{tucker}"


ALGORITHM = Algorithm(
    name="loha", title="LoHa", family="loha", priority=20, delta_shape=delta_shape, rank=rank,
    delta=delta, bypass=bypass,
    row_parts=row_parts, delta_block=delta_block, dynamic_numel=dynamic_numel, describe=describe,
)
