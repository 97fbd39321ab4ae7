"""Shape helpers shared by the algorithm modules."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def matrix(shapes: Mapping[str, tuple[int, ...]], name: str) -> tuple[int, int]:
    """The (rows, cols) of a 2-D factor; 4-D factors with 1x1 kernels (conv-style saves) count as 2-D."""
    shape = tuple(shapes[name])
    if len(shape) == 4 and shape[2:] == (1, 1):
        shape = shape[:2]
    if len(shape) != 2:
        raise ValueError(f"'{name}' must be a 2-D matrix, found shape {list(shape)}")
    return shape[0], shape[1]


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Drop trailing 1x1 kernel dims so conv-style saves of Linear factors work as matrices."""
    if t.dim() == 4 and t.shape[2:] == (1, 1):
        return t.reshape(t.shape[0], t.shape[1])
    return t


def product_shape(shapes: Mapping[str, tuple[int, ...]], a: str, b: str, t: str) -> tuple[int, int]:
    """(out, in) of `a @ b`, or of LyCORIS's tucker form `a^T @ t @ b` when the core `t` is present
    (t (r1, r2), a (r1, out), b (r2, in))."""
    if a not in shapes or b not in shapes:
        raise ValueError(f"needs both '{a}' and '{b}'")
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


def product(tensors: Mapping[str, torch.Tensor], a: str, b: str, t: str, dtype: torch.dtype) -> torch.Tensor:
    """The dense matrix `a @ b` (or `a^T @ t @ b`) in `dtype`."""
    ma = as_matrix(tensors[a]).to(dtype)
    mb = as_matrix(tensors[b]).to(dtype)
    core = tensors.get(t)
    if core is not None:
        return ma.T @ as_matrix(core).to(dtype) @ mb
    return ma @ mb
