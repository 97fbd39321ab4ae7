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
apart): `row_align` is the whole height, so a merge takes it in one block, and a placement of part
of the delta's rows cannot be applied. Columns are independent (`delta_cols`). Dynamic mode applies
the stages to the base output without its bias (`add_`), O(tokens * out * b * m).

Dynamic kernel, by measurement (2-core Xeon, 1024 tokens, 3840 x 3840, b = 30, 8 stages): the
butterfly costs 81 ms where the base bf16 matmul costs 12 ms (6.6x; the small batched matmuls and the
per-stage reshuffles do not reach bf16 matmul speed), 75 ms against 75 ms in fp32; the whole layer in
dynamic mode runs at 5.4x its plain bf16 forward (8x at 10240 x 3840, b = 20, 10 stages). A cached
dense delta would cost one more matmul (14 ms) but hold out x in values, as much as the weight
itself, per layer. Dynamic mode is the low-memory, hot-swap path, and BOFT's structure allows avoiding the dense
delta, so the butterfly stays; for speed, merge BOFT (mode="merged" costs nothing per step).
"""

from __future__ import annotations

import torch

from ..placement import Placement
from . import oft
from .base import Algorithm, Alpha, Kernel, Shapes, Tensors


def _shape(shapes: Shapes) -> tuple[int, int, int]:
    m, n, b, _ = oft.blocks_shape(shapes, ndim=4)
    out = n * b
    if b % 2 or any(out % (2**i * b) for i in range(m)):
        raise ValueError(f"'oft_blocks' {[m, n, b, b]} is no butterfly over {out} rows "
                         f"(needs an even block and out divisible by 2^i * {b} for each of the {m} stages)")
    return m, n, b


def delta_shape(shapes: Shapes) -> tuple[int, int]:
    """(out, 0): the rows from the blocks; 0 = the weight's own input width (see `check_weight`)."""
    m, n, b = _shape(shapes)
    oft.check_rescale(shapes, n * b)
    return n * b, 0


def check_weight(shapes: Shapes, weight_shape: tuple[int, ...]) -> None:
    oft.check_weight(shapes, weight_shape, ndim=4)


def rank(shapes: Shapes) -> int | None:
    return None  # alpha is the constraint, never a scale


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    """fp32 parts: "rot" R - I for every stage and block (m, n, b, b), "rescale" (out,) if any."""
    parts = {"rot": oft.cayley(tensors["oft_blocks"], oft.constraint(tensors)).float()}
    if "rescale" in tensors:
        parts["rescale"] = tensors["rescale"].reshape(-1).float()
    return parts


def row_align(parts: Tensors) -> int:
    """All rows: from `row_parts`' "rot" (or the file's "oft_blocks")."""
    m, n, b, _ = (parts["rot"] if "rot" in parts else parts["oft_blocks"]).shape
    return n * b


def _stage_rows(v: torch.Tensor, rot: torch.Tensor, k: int) -> torch.Tensor:
    """(R - I) applied to the butterfly blocks of v's rows (out, cols): rows viewed as (c, 2, k) are
    read in (c, k, 2) order and cut into blocks of b; whole rows move, so W needs no transpose."""
    out, cols = v.shape
    n, b, _ = rot.shape
    p = v.reshape(out // (2 * k), 2, k, cols).transpose(1, 2).reshape(n, b, cols)
    c = torch.bmm(rot, p)
    return c.reshape(out // (2 * k), k, 2, cols).transpose(1, 2).reshape(out, cols)


def butterfly_rows(v: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """B v - v for v (out, cols), summed stage by stage so it keeps its digits when B is near I."""
    rot = rot.to(v.dtype)
    half = rot.shape[-1] // 2
    cur, d = v, torch.zeros_like(v)
    for i in range(rot.shape[0]):
        c = _stage_rows(cur, rot[i], 2**i * half)
        cur, d = cur + c, d + c
    return d


def _whole(rot: torch.Tensor, lo: int, hi: int) -> None:
    out = rot.shape[1] * rot.shape[2]
    if (lo, hi) != (0, out):
        raise ValueError(f"BOFT rows [{lo}, {hi}) are part of its {out} rows; its butterfly needs all of them")


def delta_cols(parts: Tensors, w_cols: torch.Tensor) -> torch.Tensor:
    """Columns of the fp32 delta from the same columns of W (all rows)."""
    w = w_cols.float()
    gs = oft.gain_shift(parts.get("rescale"), 1.0, w.shape[0])
    return oft.combine(butterfly_rows(w, parts["rot"]), w, {k: v[:, None] for k, v in gs.items()})


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The whole fp32 delta (lo, hi must be 0, out: see `row_align`) from all of W."""
    if weight is None:
        raise ValueError("BOFT's delta depends on the base weight")
    _whole(parts["rot"], lo, hi)
    return delta_cols(parts, weight)


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        raise ValueError("BOFT's delta depends on the base weight")
    return delta_cols(row_parts(tensors), weight)


def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """("boft", fp32 tensors): "rot" (all stages), "gain"/"offset" (scale and rescale folded), and the
    weight facts `bound` needs. The placement must keep every delta row."""
    parts = row_parts(tensors)
    _whole(parts["rot"], placement.d0, placement.d0 + placement.n)
    out = {"rot": parts["rot"], **oft.gain_shift(parts.get("rescale"), scale, placement.n)}
    return "boft", {**out, **_weight_facts(weight)}


def _weight_facts(weight: torch.Tensor | None) -> dict[str, torch.Tensor]:
    zero = torch.zeros((), dtype=torch.float64)
    if weight is None or not weight.numel():
        return {"w_colmax": zero, "w_absmax": zero}
    w = weight.double()
    return {"w_colmax": w.norm(dim=0).max(), "w_absmax": w.abs().max()}


def add_(rows: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None, t: Tensors, alpha: Alpha) -> None:
    """rows += alpha * delta x, from wx = x @ W^T (the base output without bias)."""
    assert wx is not None  # uses_wx: the dispatcher passes the base output
    # The stages move whole rows of wx^T (one value per token): cheaper than permuting wx's last axis.
    d = butterfly_rows(wx.T.contiguous(), t["rot"]).T
    rows.add_(oft.combine(d, wx, t) * alpha)


def bound(t: Tensors) -> float:
    """|((B - I) W)_ij| <= ||B - I||_2 ||W[:, j]|| (Cauchy-Schwarz), with ||B - I||_2 at most 2 (B is
    orthogonal) and at most prod(1 + e_i) - 1 (B - I = prod(I + E_i) - I, e_i >= ||E_i||_2 the largest
    Frobenius norm of a stage's R - I blocks). The gain multiplies that, the shift adds max|shift| max|W|;
    1% slack for the rounding of B. fp64."""
    def amax(v: torch.Tensor) -> float:
        return float(v.double().abs().max()) if v.numel() else 0.0

    rot = t["rot"].double()
    grow = float(torch.prod(1.0 + rot.flatten(2).norm(dim=2).amax(dim=1))) - 1.0 if rot.numel() else 0.0
    shift = amax(t["offset"]) * float(t["w_absmax"]) if "offset" in t else 0.0
    return 1.01 * min(2.0, grow) * amax(t["gain"]) * float(t["w_colmax"]) + shift


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        raise ValueError("BOFT's delta depends on the base weight")
    x2 = x.reshape(-1, x.shape[-1])
    wx = x2 @ weight.to(x.dtype).T
    t = prepare(tensors, 1.0, Placement.of(None, None, weight.shape[0]), None)[1]
    rows = torch.zeros_like(wx)
    add_(rows, x2, wx, t, 1.0)
    return rows.reshape(*x.shape[:-1], wx.shape[-1])


def dynamic_numel(shapes: Shapes) -> int:
    m, n, b = _shape(shapes)
    return m * n * b * b + n * b * (2 if "rescale" in shapes else 1)


def describe(shapes: Shapes) -> str:
    m, n, b = _shape(shapes)
    return f"butterfly of {m} stages x {n} rotations of {b}x{b}" + (" + rescale" if "rescale" in shapes else "")


KERNEL = Kernel(name="boft", add_=add_, bound=bound, uses_wx=True, probe=True)  # bound: Cauchy-Schwarz

ALGORITHM = Algorithm(
    name="boft", title="BOFT", family="oft", priority=43, delta_shape=lambda s: (delta_shape(s)[0], None),
    rank=rank, delta=delta, bypass=bypass, row_parts=row_parts, delta_block=delta_block,
    dynamic_numel=dynamic_numel, describe=describe, needs_weight=True, row_align=row_align, prepare=prepare,
    kernels=(KERNEL,), claims=lambda s: len(s.get("oft_blocks", ())) == 4, alpha_role="alpha",
    absolute_alpha_role=oft.ABSOLUTE, canonical=oft.canonical,
    unit_scale="BOFT's alpha is its constraint, not a scale",
)
