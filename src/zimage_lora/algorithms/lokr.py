"""LoKr: delta = kron(W1, W2), W1 = w1 or w1_a @ w1_b, W2 = w2 or w2_a @ w2_b or tucker(t2, w2_a, w2_b).

The bypass never builds kron(W1, W2): with x reshaped to (in1, in2) blocks, x @ kron(W1, W2).T is
W1 . X . W2^T, two small matmuls per token instead of one (out x in) one.
"""

from __future__ import annotations

import torch

from ._shapes import as_matrix, matrix, product, product_shape


def _factor_shape(shapes: dict[str, tuple[int, ...]], i: int) -> tuple[int, int]:
    w, a, b, t = f"w{i}", f"w{i}_a", f"w{i}_b", f"t{i}"
    if w in shapes:
        return matrix(shapes, w)
    if a not in shapes or b not in shapes:
        raise ValueError(f"LoKr needs '{w}' or both '{a}' and '{b}'")
    return product_shape(shapes, a, b, t)


def delta_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    o1, i1 = _factor_shape(shapes, 1)
    o2, i2 = _factor_shape(shapes, 2)
    return o1 * o2, i1 * i2


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    # alpha / rank applies only when a factor is decomposed; both full means scale 1 (LyCORIS).
    for b in ("w1_b", "w2_b"):
        if b in shapes:
            return matrix(shapes, b)[0]
    return None


def _factor(tensors: dict[str, torch.Tensor], i: int, dtype: torch.dtype) -> torch.Tensor:
    w = tensors.get(f"w{i}")
    if w is not None:
        return as_matrix(w).to(dtype)
    return product(tensors, f"w{i}_a", f"w{i}_b", f"t{i}", dtype)


def factors(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """(W1, W2) as dense matrices in `dtype`; both are small, this is what dynamic mode caches."""
    return _factor(tensors, 1, dtype), _factor(tensors, 2, dtype)


def delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    w1, w2 = factors(tensors, torch.float32)
    return torch.kron(w1, w2)


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x @ kron(w1, w2).T without building the Kronecker product."""
    o1, i1 = w1.shape
    o2, i2 = w2.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, i1, i2)
    # (n, i1, i2) @ (i2, o2) -> (n, i1, o2); then W1 (o1, i1) @ that -> (n, o1, o2)
    y = torch.matmul(w1, xb @ w2.T)
    return y.reshape(*lead, o1 * o2)


def bypass(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    w1, w2 = factors(tensors, x.dtype)
    return kron_apply(x, w1, w2)


def row_parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w1, w2 = factors(tensors, torch.float32)
    return {"w1": w1, "w2": w2}


def delta_block(parts: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of kron(W1, W2): only the rows of W1 that cover the block are expanded."""
    w1, w2 = parts["w1"], parts["w2"]
    o2 = w2.shape[0]
    i0, i1 = lo // o2, (hi - 1) // o2 + 1
    return torch.kron(w1[i0:i1], w2)[lo - i0 * o2 : hi - i0 * o2]
