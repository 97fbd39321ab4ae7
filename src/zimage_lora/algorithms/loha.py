"""LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; tucker cores t1 / t2 optional."""

from __future__ import annotations

import torch

from ._shapes import as_matrix, matrix, product, product_shape


def _half_shape(shapes: dict[str, tuple[int, ...]], i: int) -> tuple[int, int]:
    return product_shape(shapes, f"w{i}_a", f"w{i}_b", f"t{i}")


def delta_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    first, second = _half_shape(shapes, 1), _half_shape(shapes, 2)
    if first != second:
        raise ValueError(f"LoHa halves disagree: w1 gives {list(first)}, w2 gives {list(second)}")
    return first


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return matrix(shapes, "w1_b")[0]


def _half(tensors: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    return product(tensors, f"w{i}_a", f"w{i}_b", f"t{i}", torch.float32)


def delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return _half(tensors, 1) * _half(tensors, 2)


def bypass(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    # The Hadamard product has no cheap factored form; dynamic mode caches `delta` instead.
    return x @ delta(tensors).to(x.dtype).T


def row_parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each half as (left, right) with its tucker core folded into the left factor."""
    parts = {}
    for i in (1, 2):
        a = as_matrix(tensors[f"w{i}_a"]).float()
        if f"t{i}" in tensors:
            a = (a.T @ as_matrix(tensors[f"t{i}"]).float()).contiguous()
        parts[f"a{i}"] = a
        parts[f"b{i}"] = as_matrix(tensors[f"w{i}_b"]).float()
    return parts


def delta_block(parts: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    return (parts["a1"][lo:hi] @ parts["b1"]) * (parts["a2"][lo:hi] @ parts["b2"])
