"""OFT (LyCORIS `diag-oft`): a block-diagonal rotation of the base weight's output rows.

Tensors, as LyCORIS's DiagOFTModule saves them (its default `state_dict`, no custom one):
- `oft_blocks` (n, b, b): n blocks of size b with n * b == out; only the skew part Q = B - B^T is used;
- `alpha` (0-d): the *constraint*, not a scale. When alpha > 0 and ||Q||_F (all blocks together,
  plus 1e-8) exceeds alpha * out, Q is scaled down to norm alpha * out;
- `rescale` (out, 1), optional (`rescaled=True`): a per-output-row factor applied after the rotation.

R = (I + Q)(I - Q)^-1 per block (Cayley, orthogonal). LyCORIS contracts the block's row index with
R's *first* index (einsum "k n m, k n ... -> k m ..."), so each block of rows becomes R^T @ W_block:

    W' = rescale * R^T W (blockwise),  delta = W' - W.

The delta depends on W, so every function takes the base weight. There is no rank: alpha never
scales, and `rank` returns None (scale 1). Strength is linear here (W + t * delta). LyCORIS agrees at
every strength without `rescale` (its multiplier interpolates R toward I, which is linear in the
delta); with `rescale` it scales only the rotation part, so the two agree at strength 1 only.

Rows: block k of the delta needs only block k of W, so row ranges widen to whole blocks (`row_span`).
Dynamic mode never builds the delta: the base output without bias, y, becomes
rescale * (y_block @ R) - y per block (`output_delta`).
"""

from __future__ import annotations

import math

import torch

from ._shapes import matrix


def _blocks_shape(shapes: dict[str, tuple[int, ...]], ndim: int = 3) -> tuple[int, ...]:
    if "oft_blocks" not in shapes:
        raise ValueError("needs 'oft_blocks'")
    shape = tuple(shapes["oft_blocks"])
    if len(shape) != ndim or shape[-1] != shape[-2] or 0 in shape:
        want = "(n, b, b)" if ndim == 3 else "(m, n, b, b)"
        raise ValueError(f"'oft_blocks' must be {want} with square blocks, found shape {list(shape)}")
    return shape


def _check_rescale(shapes: dict[str, tuple[int, ...]], out: int) -> None:
    if "rescale" in shapes:
        numel = math.prod(shapes["rescale"])
        if numel != out or len(shapes["rescale"]) > 2:
            found = list(shapes["rescale"])
            raise ValueError(f"'rescale' must hold one value per output row ({out}), found shape {found}")


def delta_shape(shapes: dict[str, tuple[int, ...]], weight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in) of the delta: the base weight's, once the blocks are checked to tile its rows."""
    n, b, _ = _blocks_shape(shapes)
    out, n_in = matrix({"weight": weight_shape}, "weight")
    if n * b != out:
        raise ValueError(f"'oft_blocks' {n} blocks of {b} rows cover {n * b} rows, the weight has {out}")
    _check_rescale(shapes, out)
    return out, n_in


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return None  # alpha is the constraint, never a scale


def constraint(tensors: dict[str, torch.Tensor], out: int) -> float:
    """LyCORIS's norm bound on Q: alpha * out (DiagOFTModule.__init__), 0 = none."""
    alpha = tensors.get("alpha")
    return 0.0 if alpha is None else float(alpha) * out


def cayley(blocks: torch.Tensor, bound: float) -> torch.Tensor:
    """R - I for every block (any leading dims), in float64: R is within rounding of I for small Q,
    so keeping R - I instead of R avoids the cancellation a later `R @ W - W` would suffer."""
    b = blocks.double()
    q = b - b.transpose(-1, -2)
    if bound > 0:
        q_norm = float(torch.linalg.vector_norm(q)) + 1e-8
        if q_norm > bound:
            q = q * (bound / q_norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    # (I + Q)(I - Q)^-1 == (I - Q)^-1 (I + Q) (both are functions of Q); minus I that is 2 (I - Q)^-1 Q.
    return 2.0 * torch.linalg.solve(eye - q, q)


def _rescale(tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
    r = tensors.get("rescale")
    return None if r is None else r.reshape(-1, 1).float()


def row_parts(tensors: dict[str, torch.Tensor], out: int) -> dict[str, torch.Tensor]:
    """fp32 parts for any rows of the delta: R - I per block and the optional rescale column."""
    parts = {"rot": cayley(tensors["oft_blocks"], constraint(tensors, out)).float()}
    rescale = _rescale(tensors)
    if rescale is not None:
        parts["rescale"] = rescale
    return parts


def row_span(shapes: dict[str, tuple[int, ...]], lo: int, hi: int) -> tuple[int, int]:
    """The rows of W that rows [lo, hi) of the delta need: [lo, hi) widened to whole blocks."""
    b = _blocks_shape(shapes)[1]
    return lo // b * b, -(-hi // b) * b


def delta_block(parts: dict[str, torch.Tensor], w_rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the fp32 delta from `w_rows` = W[row_span(lo, hi)] (any dtype)."""
    rot = parts["rot"]
    b = rot.shape[-1]
    start = lo // b * b
    k0, k1 = start // b, -(-hi // b)
    w = w_rows.float()
    # (R^T - I) @ W_block for each block: contract the block's row index with rot's first index.
    d = torch.einsum("knm,kni->kmi", rot[k0:k1], w.reshape(k1 - k0, b, -1)).reshape(w.shape)
    if "rescale" in parts:
        s = parts["rescale"][start : start + w.shape[0]]
        d = s * d + (s - 1.0) * w  # rescale * R^T W - W without forming R^T W - W twice
    return d[lo - start : hi - start]


def delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The full fp32 delta rescale * R^T W - W (unscaled: strength multiplies it)."""
    out = weight.shape[0]
    return delta_block(row_parts(tensors, out), weight, 0, out)


def prepare(tensors: dict[str, torch.Tensor], out: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What dynamic mode keeps: R - I per block (n, b, b) and the rescale row, in `dtype`."""
    return {k: v.to(dtype) for k, v in row_parts(tensors, out).items()}


def output_delta(y: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """delta @ x from the base output without its bias, y = x @ W^T: per block y_k @ (R - I),
    then the rescale. O(tokens * out * b), against O(tokens * out * in) for a dense delta."""
    rot = parts["rot"]
    n, b, _ = rot.shape
    lead = y.shape[:-1]
    yb = y.reshape(-1, n, b)
    d = torch.einsum("tkn,knm->tkm", yb, rot).reshape(*lead, n * b)
    if "rescale" in parts:
        s = parts["rescale"].reshape(-1)
        d = s * d + (s - 1.0) * y
    return d


def abs_bound(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> float:
    """An upper bound on |every value| of the delta. R is orthogonal, so |(R^T W_k)_mj| is at most
    the norm of column j of block k of W; the rescale multiplies that, and the "- W" adds max|W|.
    1% slack covers the rounding by which the computed R misses orthogonality."""
    n, b, _ = tensors["oft_blocks"].shape
    w = weight.double()
    col = float(w.reshape(n, b, -1).norm(dim=1).max()) if w.numel() else 0.0
    scale = float(tensors["rescale"].double().abs().max()) if "rescale" in tensors else 1.0
    return 1.01 * scale * col + (float(w.abs().max()) if w.numel() else 0.0)


def dynamic_bytes(shapes: dict[str, tuple[int, ...]], element_size: int) -> int:
    """Bytes dynamic mode holds: the n (b x b) blocks of R - I and the rescale row."""
    n, b, _ = _blocks_shape(shapes)
    return (n * b * b + (n * b if "rescale" in shapes else 0)) * element_size
