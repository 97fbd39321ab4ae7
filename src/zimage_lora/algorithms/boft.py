"""BOFT (LyCORIS `boft`): a butterfly product of block-diagonal rotations of the weight's output rows.

Tensors, as LyCORIS's ButterflyOFTModule saves them: `oft_blocks` (m, n, b, b) — m butterfly stages,
each n blocks of b rows (n * b == out, b even); `alpha` (the constraint on ||Q||_F over all stages,
times out, as in diag-oft); optional `rescale` (out, 1). LyCORIS chooses b as the largest even
divisor of out not above lora_dim whose cofactor n is a power of two (`power2factorization`), and
m = log2(n) + 1. Stage i (i = 0..m-1) mixes rows 2^i * b / 2 apart: the rows, viewed as (c, 2, k)
with k = 2^i * b / 2, are read in (c, k, 2) order, cut into blocks of b, and each block is
multiplied by its R (Cayley of the skew part, as diag-oft) — R @ block here, where diag-oft uses R^T.

    W' = rescale * B W,  B = S_{m-1} ... S_0,  delta = W' - W.

Strength is linear here (W + t * delta). LyCORIS interpolates each stage toward I instead, so the
two agree at strength 1 only. Rows of the delta need all rows of W (the last stage mixes rows out/2
apart), but columns are independent: `delta_cols` gives any columns from the same columns of W,
so merges should go by column blocks. Dynamic mode applies the stages to the base output without
its bias (`output_delta`), O(tokens * out * b * m).
"""

from __future__ import annotations

import torch

from . import oft
from ._shapes import matrix


def delta_shape(shapes: dict[str, tuple[int, ...]], weight_shape: tuple[int, ...]) -> tuple[int, int]:
    m, n, b, _ = oft._blocks_shape(shapes, ndim=4)
    out, n_in = matrix({"weight": weight_shape}, "weight")
    if n * b != out:
        raise ValueError(f"'oft_blocks' {n} blocks of {b} rows cover {n * b} rows, the weight has {out}")
    if b % 2 or any(out % (2**i * b) for i in range(m)):
        raise ValueError(f"'oft_blocks' {list(shapes['oft_blocks'])} is no butterfly over {out} rows "
                         f"(needs an even block and out divisible by 2^i * {b} for each of the {m} stages)")
    oft._check_rescale(shapes, out)
    return out, n_in


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return None  # alpha is the constraint, never a scale


def row_parts(tensors: dict[str, torch.Tensor], out: int) -> dict[str, torch.Tensor]:
    """fp32 parts: R - I for every stage and block (m, n, b, b), and the optional rescale column."""
    parts = {"rot": oft.cayley(tensors["oft_blocks"], oft.constraint(tensors, out)).float()}
    if "rescale" in tensors:
        parts["rescale"] = tensors["rescale"].reshape(-1).float()
    return parts


def prepare(tensors: dict[str, torch.Tensor], out: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in row_parts(tensors, out).items()}


def _stage(v: torch.Tensor, rot: torch.Tensor, k: int) -> torch.Tensor:
    """(R - I) applied to the butterfly blocks of the last axis of v, in v's own order."""
    *lead, out = v.shape
    n, b, _ = rot.shape
    p = v.reshape(*lead, out // (2 * k), 2, k).transpose(-1, -2).reshape(*lead, n, b)
    c = torch.einsum("kij,...kj->...ki", rot, p)
    return c.reshape(*lead, out // (2 * k), k, 2).transpose(-1, -2).reshape(*lead, out)


def _apply(v: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """rescale * B v - v on the last axis; B v - v is summed stage by stage so it keeps its digits."""
    rot = parts["rot"]
    half = rot.shape[-1] // 2
    cur, d = v, torch.zeros_like(v)
    for i in range(rot.shape[0]):
        c = _stage(cur, rot[i], 2**i * half)
        cur, d = cur + c, d + c
    if "rescale" in parts:
        s = parts["rescale"]
        d = s * d + (s - 1.0) * v
    return d


def delta_cols(parts: dict[str, torch.Tensor], w_cols: torch.Tensor) -> torch.Tensor:
    """Columns of the fp32 delta from the same columns of W (all rows)."""
    return _apply(w_cols.float().T, parts).T


def delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    return delta_cols(row_parts(tensors, weight.shape[0]), weight)


def row_span(shapes: dict[str, tuple[int, ...]], lo: int, hi: int) -> tuple[int, int]:
    """Every row of W: the butterfly's last stage mixes rows out / 2 apart."""
    m, n, b, _ = oft._blocks_shape(shapes, ndim=4)
    return 0, n * b


def delta_block(parts: dict[str, torch.Tensor], w_rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) from all of W: costs a whole delta per call, so prefer `delta_cols`."""
    return delta_cols(parts, w_rows)[lo:hi]


def output_delta(y: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """delta @ x from the base output without its bias, y = x @ W^T."""
    return _apply(y, parts)


def abs_bound(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> float:
    """B is orthogonal, so |(B W)_ij| <= ||W[:, j]||; the rescale multiplies that, "- W" adds max|W|
    (1% slack for the rounding by which the computed stages miss orthogonality)."""
    w = weight.double()
    if not w.numel():
        return 0.0
    scale = float(tensors["rescale"].double().abs().max()) if "rescale" in tensors else 1.0
    return 1.01 * scale * float(w.norm(dim=0).max()) + float(w.abs().max())


def dynamic_bytes(shapes: dict[str, tuple[int, ...]], element_size: int) -> int:
    m, n, b, _ = oft._blocks_shape(shapes, ndim=4)
    return (m * n * b * b + (n * b if "rescale" in shapes else 0)) * element_size
