"""GLoRA (LyCORIS `glora`): delta = W @ a1 @ a2 + b1 @ b2, scaled by alpha / rank.

Tensors, as LyCORIS's GLoRAModule.custom_state_dict saves them for a Linear (out, in), rank r:
`a1` (in, r), `a2` (r, in), `b1` (out, r), `b2` (r, in), `alpha` (0-d). `a2` and `b2` are saved
already multiplied by the trained `scalar` (and LyCORIS resets `scalar` to 1 on load), so the file
alone gives the delta. Rank is `a2`'s rows; alpha 0 or absent means alpha = rank (scale 1), as in
GLoRAModule.__init__.

The a-half depends on the base weight W. Rows [lo, hi) of the delta need the same rows of W only.
Both halves are linear in the strength, as LyCORIS's multiplier is.

Dynamic mode never builds the delta. W a1 a2 + b1 b2 = [W a1 | b1] @ [a2 ; b2], a rank-2r LoRA, so
`prepare` hands LoRA's own kernel up = scale * [W_rows a1 | b1_rows] (n, 2r), down = [a2 ; b2]
(2r, in): any placement, DoRA's row fold, one kernel. W a1 is a copy taken at prepare time: the
layer prepares it again when the base weight changes (`needs_weight`, as DoRA). The input-transform
form LyCORIS's bypass uses, y = base(x + c (x a2^T) a1^T) + c (x b2^T) b1^T (`transform` + `add_b_`,
whole placements only, reading the live base weight), is kept for reference; `prepare` does not pick it.
"""

from __future__ import annotations

import torch

from ..placement import Placement
from ._shapes import as_matrix, matrix
from .base import Algorithm, Alpha, KernelKind, Shapes, Tensors

FACTORS = ("a1", "a2", "b1", "b2")


def delta_shape(shapes: Shapes) -> tuple[int, int]:
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
    return b1_out, a2_in


def rank(shapes: Shapes) -> int:
    return matrix(shapes, "a2")[0]


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    """The four factors as fp32 matrices (a1 @ a2 is in x in, so it is never formed)."""
    return {k: as_matrix(tensors[k]).float() for k in FACTORS}


def _need(weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        raise ValueError("GLoRA's delta depends on the base weight")
    return weight


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi) of the fp32 delta from `weight` = W rows [lo, hi): (W a1) a2 + b1[lo:hi] b2."""
    return torch.addmm(parts["b1"][lo:hi] @ parts["b2"], _need(weight).float() @ parts["a1"], parts["a2"])


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The full fp32 delta, unscaled (alpha / rank and the strength multiply it)."""
    return delta_block(row_parts(tensors), 0, _need(weight).shape[0], weight=weight)


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x @ delta.T in x's dtype, unscaled: ((x a2^T) a1^T) W^T + (x b2^T) b1^T."""
    f = {k: as_matrix(tensors[k]).to(x.dtype) for k in FACTORS}
    return ((x @ f["a2"].T) @ f["a1"].T) @ _need(weight).to(x.dtype).T + (x @ f["b2"].T) @ f["b1"].T


def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """("lora", fp32 tensors) for LoRA's kernel: down = [a2 ; b2], up = scale * [W_rows a1 | b1_rows],
    with W_rows the placement's rows of the base weight."""
    p = row_parts(tensors)
    d0, n = placement.d0, placement.n
    up = torch.cat([_need(weight).float() @ p["a1"], p["b1"][d0 : d0 + n]], dim=1) * scale
    return KernelKind.LORA, {"down": torch.cat([p["a2"], p["b2"]]).contiguous(), "up": up.contiguous()}


def transform(x: torch.Tensor, t: Tensors) -> torch.Tensor:
    """The a-half's change to the base layer's input, from prepared {"a1": scale * a1, "a2", ...}."""
    return (x @ t["a2"].to(x.dtype).T) @ t["a1"].to(x.dtype).T


def add_b_(rows: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None, t: Tensors, alpha: Alpha) -> None:
    """rows += alpha * the b-half, from prepared {"b1": scale * b1 rows, "b2"}."""
    rows.add_(((x @ t["b2"].to(x.dtype).T) @ t["b1"].to(x.dtype).T) * alpha)


def prepare_transform(tensors: Tensors, scale: float) -> dict[str, torch.Tensor]:
    """Prepared tensors for `transform` + `add_b_` (whole placements: the input feeds every row)."""
    p = row_parts(tensors)
    return {"a1": p["a1"] * scale, "a2": p["a2"], "b1": p["b1"] * scale, "b2": p["b2"]}


def dynamic_numel(shapes: Shapes) -> int:
    """LoRA's kernel tensors: down (2r, in) and up (out, 2r)."""
    n_out, n_in = delta_shape(shapes)
    return 2 * rank(shapes) * (n_in + n_out)


def describe(shapes: Shapes) -> str:
    n_out, n_in = delta_shape(shapes)
    r = rank(shapes)
    return f"W @ {n_in}x{r} @ {r}x{n_in} + {n_out}x{r} @ {r}x{n_in}"


def split_rows(tensors: Tensors, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) of a fused delta, exactly: the a-half reads the module's own weight rows, so only
    b1's rows are cut."""
    return {**tensors, "b1": as_matrix(tensors["b1"])[lo:hi]}


ALGORITHM = Algorithm(
    name="glora", title="GLoRA", family="glora", priority=44, delta_shape=delta_shape, rank=rank,
    delta=delta, bypass=bypass, row_parts=row_parts, delta_block=delta_block, split_rows=split_rows,
    dynamic_numel=dynamic_numel, describe=describe, needs_weight=True, prepare=prepare,
)
