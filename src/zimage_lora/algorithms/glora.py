"""GLoRA (LyCORIS `glora`): delta = W @ a1 @ a2 + b1 @ b2, scaled by alpha / rank.

Tensors, as LyCORIS's GLoRAModule.custom_state_dict saves them for a Linear (out, in), rank r:
`a1` (in, r), `a2` (r, in), `b1` (out, r), `b2` (r, in), `alpha` (0-d). `a2` and `b2` are saved
already multiplied by the trained `scalar` (and LyCORIS resets `scalar` to 1 on load), so the file
alone gives the delta. Rank is `a2`'s rows; alpha 0 or absent means alpha = rank (scale 1), as in
GLoRAModule.__init__.

The a-half depends on the base weight W (the layer's own weight, not one with other adapters merged).
Rows: rows [lo, hi) of the delta need the same rows of W only. Dynamic mode never builds the delta:
y = base(x + c * (x @ a2^T) @ a1^T) + c * (x @ b2^T) @ b1^T, with c = strength * alpha / rank — the
a-half as a transform of the base layer's input (one base matmul, its bias once), the b-half as a
LoRA-like bypass. Both halves are linear in the strength, as LyCORIS's multiplier is.
"""

from __future__ import annotations

import torch

from ._shapes import as_matrix, matrix

FACTORS = ("a1", "a2", "b1", "b2")


def delta_shape(shapes: dict[str, tuple[int, ...]], weight_shape: tuple[int, ...] | None = None) -> tuple[int, int]:
    missing = [k for k in FACTORS if k not in shapes]
    if missing:
        raise ValueError(f"GLoRA needs {list(FACTORS)}; missing {missing}")
    a1_in, a1_r = matrix(shapes, "a1")
    a2_r, a2_in = matrix(shapes, "a2")
    b1_out, b1_r = matrix(shapes, "b1")
    b2_r, b2_in = matrix(shapes, "b2")
    if not a1_r == a2_r == b1_r == b2_r:
        raise ValueError(f"GLoRA ranks disagree: a1 {a1_r}, a2 {a2_r}, b1 {b1_r}, b2 {b2_r}")
    if not a1_in == a2_in == b2_in:
        raise ValueError(f"GLoRA input widths disagree: a1 rows {a1_in}, a2 columns {a2_in}, b2 columns {b2_in}")
    if weight_shape is not None and tuple(matrix({"weight": weight_shape}, "weight")) != (b1_out, a2_in):
        raise ValueError(f"GLoRA gives a {b1_out}x{a2_in} delta, the weight is {list(weight_shape)}")
    return b1_out, a2_in


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return matrix(shapes, "a2")[0]


def row_parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The four factors as fp32 matrices (a1 @ a2 is in x in, so it is never formed)."""
    return {k: as_matrix(tensors[k]).float() for k in FACTORS}


def row_span(shapes: dict[str, tuple[int, ...]], lo: int, hi: int) -> tuple[int, int]:
    return lo, hi


def delta_block(parts: dict[str, torch.Tensor], w_rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the fp32 delta from `w_rows` = W[lo:hi]: (W_rows @ a1) @ a2 + b1[lo:hi] @ b2."""
    return torch.addmm(parts["b1"][lo:hi] @ parts["b2"], w_rows.float() @ parts["a1"], parts["a2"])


def delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The full fp32 delta, unscaled (alpha / rank and the strength multiply it)."""
    return delta_block(row_parts(tensors), weight, 0, weight.shape[0])


def prepare(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What dynamic mode keeps: the four factors in `dtype`."""
    return {k: as_matrix(tensors[k]).to(dtype) for k in FACTORS}


def input_delta(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The a-half's change to the base layer's input, unscaled: (x @ a2^T) @ a1^T (width in)."""
    return (x @ parts["a2"].T) @ parts["a1"].T


def output_delta(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The b-half's addition to the output, unscaled: (x @ b2^T) @ b1^T (width out)."""
    return (x @ parts["b2"].T) @ parts["b1"].T


def forward(x: torch.Tensor, base, parts: dict[str, torch.Tensor], c: float) -> torch.Tensor:
    """The adapted layer's output: `base` is the layer's own forward (weight and bias), c the scale."""
    return base(x + c * input_delta(x, parts)) + c * output_delta(x, parts)


def abs_bound(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> float:
    """An upper bound on |every value| of the unscaled delta (fp64, Cauchy-Schwarz twice):
    |(W a1 a2)_ij| <= ||W_i|| ||a1||_F ||a2_:j||,  |(b1 b2)_ij| <= ||b1_i|| ||b2_:j||."""
    f = {k: as_matrix(tensors[k]).double() for k in FACTORS}
    w = weight.double()

    def rows(m: torch.Tensor) -> float:
        return float(m.norm(dim=1).max()) if m.numel() else 0.0

    def cols(m: torch.Tensor) -> float:
        return float(m.norm(dim=0).max()) if m.numel() else 0.0

    return rows(w) * float(f["a1"].norm()) * cols(f["a2"]) + rows(f["b1"]) * cols(f["b2"])


def dynamic_bytes(shapes: dict[str, tuple[int, ...]], element_size: int) -> int:
    n = 0
    for k in FACTORS:
        rows, columns = matrix(shapes, k)
        n += rows * columns
    return n * element_size
