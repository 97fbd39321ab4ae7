"""LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; tucker cores t1 / t2 optional."""

from __future__ import annotations

import torch

from ._shapes import matrix, product, product_shape


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
