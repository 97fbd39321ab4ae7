"""LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; tucker cores t1 / t2 optional."""

from __future__ import annotations

import torch

from ._shapes import as_matrix, matrix


def _half_shape(shapes: dict[str, tuple[int, ...]], i: int) -> tuple[int, int]:
    a, b, t = f"w{i}_a", f"w{i}_b", f"t{i}"
    if t in shapes:
        r1, r2 = matrix(shapes, t)
        ra, n_out = matrix(shapes, a)
        rb, n_in = matrix(shapes, b)
        if (ra, rb) != (r1, r2):
            raise ValueError(f"tucker core '{t}' is {r1}x{r2} but '{a}'/'{b}' have ranks {ra}/{rb}")
        return n_out, n_in
    n_out, ra = matrix(shapes, a)
    rb, n_in = matrix(shapes, b)
    if ra != rb:
        raise ValueError(f"rank mismatch between '{a}' ({ra} columns) and '{b}' ({rb} rows)")
    return n_out, n_in


def delta_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    first, second = _half_shape(shapes, 1), _half_shape(shapes, 2)
    if first != second:
        raise ValueError(f"LoHa halves disagree: w1 gives {list(first)}, w2 gives {list(second)}")
    return first


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return matrix(shapes, "w1_b")[0]


def _half(tensors: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    a = as_matrix(tensors[f"w{i}_a"]).float()
    b = as_matrix(tensors[f"w{i}_b"]).float()
    t = tensors.get(f"t{i}")
    if t is not None:
        return a.T @ as_matrix(t).float() @ b
    return a @ b


def delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return _half(tensors, 1) * _half(tensors, 2)


def bypass(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    # The Hadamard product has no cheap factored form; dynamic mode caches `delta` instead.
    return x @ delta(tensors).to(x.dtype).T
