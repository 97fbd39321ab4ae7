"""OFT (LyCORIS `diag-oft`): a block-diagonal rotation of the base weight's output rows.

Tensors, as LyCORIS's DiagOFTModule saves them (its default `state_dict`, no custom one):
- `oft_blocks` (n, b, b): n blocks of size b with n * b == out; only the skew part Q = B - B^T is used;
- `alpha` (0-d): the *constraint*, not a scale. When alpha > 0 and ||Q||_F (all blocks together,
  plus 1e-8) exceeds alpha * out, Q is scaled down to norm alpha * out;
- `rescale` (out, 1), optional (`rescaled=True`): a per-output-row factor applied after the rotation.

R = (I + Q)(I - Q)^-1 per block (Cayley, orthogonal). LyCORIS contracts the block's row index with
R's *first* index (einsum "k n m, k n ... -> k m ..."), so each block of rows becomes R^T @ W_block:

    W' = rescale * R^T W (blockwise),  delta = W' - W.

The delta depends on W, so the functions take the weight (rows [lo, hi) in a row block). There is no
rank: alpha never scales, `rank` is None (scale 1). Strength is linear here (W + t * delta). LyCORIS
agrees at every strength without `rescale` (its multiplier interpolates R toward I, linear in the
delta); with `rescale` it scales only the rotation part, so the two agree at strength 1 only.

Rows: block k of the delta needs only block k of W, so row blocks must be whole blocks (`row_align`);
a placement that cuts a block (a fused-qkv file whose blocks straddle q/k on split modules) cannot be
applied. Dynamic mode never builds the delta: from the base output without bias, wx, it adds
gain * (wx_k @ (R - I)) + shift * wx per block (`add_`), O(tokens * out * b).
"""

from __future__ import annotations

import math

import torch

from ..placement import Placement
from ._shapes import matrix
from .base import Algorithm, Alpha, Kernel, Shapes, Tensors


def blocks_shape(shapes: Shapes, ndim: int = 3) -> tuple[int, ...]:
    """`oft_blocks`' shape, checked: (n, b, b) for diag-oft, (m, n, b, b) for BOFT."""
    if "oft_blocks" not in shapes:
        raise ValueError("needs 'oft_blocks'")
    shape = tuple(shapes["oft_blocks"])
    if len(shape) != ndim or shape[-1] != shape[-2] or 0 in shape:
        want = "(n, b, b)" if ndim == 3 else "(m, n, b, b)"
        raise ValueError(f"'oft_blocks' must be {want} with square blocks, found shape {list(shape)}")
    return shape


def check_rescale(shapes: Shapes, out: int) -> None:
    if "rescale" in shapes:
        found = list(shapes["rescale"])
        if math.prod(found) != out or len(found) > 2:
            raise ValueError(f"'rescale' must hold one value per output row ({out}), found shape {found}")


def check_weight(shapes: Shapes, weight_shape: tuple[int, ...], ndim: int = 3) -> None:
    """The blocks must tile the weight's rows exactly (the input width is the weight's own)."""
    shape = blocks_shape(shapes, ndim)
    out = matrix({"weight": weight_shape}, "weight")[0]
    if shape[-3] * shape[-1] != out:
        raise ValueError(f"'oft_blocks' {shape[-3]} blocks of {shape[-1]} rows cover {shape[-3] * shape[-1]} rows, "
                         f"the weight has {out}")


def delta_shape(shapes: Shapes) -> tuple[int, int]:
    """(out, 0): the rows from the blocks; 0 = the weight's own input width (see `check_weight`)."""
    n, b, _ = blocks_shape(shapes)
    check_rescale(shapes, n * b)
    return n * b, 0


def rank(shapes: Shapes) -> int | None:
    return None  # alpha is the constraint, never a scale


# The role a ComfyUI-written alpha takes (formats.trainer_meta.OFTConstraint.COMFYUI): an absolute bound.
ABSOLUTE = "constraint"


def constraint(tensors: Tensors) -> float:
    """The norm bound on Q (all blocks together), 0 = none: LyCORIS's alpha * out (DiagOFTModule /
    ButterflyOFTModule.__init__), or ComfyUI's alpha itself (comfy/weight_adapter/oft.py, boft.py)."""
    if ABSOLUTE in tensors:
        return max(0.0, float(tensors[ABSOLUTE]))  # ComfyUI bounds only when alpha > 0
    alpha = tensors.get("alpha")
    b = tensors["oft_blocks"].shape
    return 0.0 if alpha is None else float(alpha) * b[-3] * b[-1]


def canonical(tensors: Tensors, scale: float, rank: int | None) -> tuple[dict[str, torch.Tensor], float, int | None]:
    """What a written file holds: LyCORIS's alpha (the only OFT spelling written), so an absolute
    ComfyUI bound becomes alpha = bound / out (the same bound under LyCORIS's rule)."""
    out = {k: v for k, v in tensors.items() if k != ABSOLUTE}
    if ABSOLUTE in tensors:
        b = tensors["oft_blocks"].shape
        bound = max(0.0, float(tensors[ABSOLUTE]))
        out["alpha"] = torch.tensor(bound / (b[-3] * b[-1]), dtype=torch.float32)
    return out, scale, rank


def baked(tensors: Tensors) -> dict[str, torch.Tensor]:
    """The same rotations for every reader: the constraint applied to the blocks (Q scaled exactly as
    `cayley` scales it) and alpha 0, which LyCORIS (alpha * out) and ComfyUI (alpha) both read as no
    bound. For a file whose alpha would mean a different bound to the application loading it."""
    out = {k: v for k, v in tensors.items() if k not in ("alpha", ABSOLUTE)}
    bound = constraint(tensors)
    blocks = tensors["oft_blocks"]
    q_norm = float(torch.linalg.vector_norm(blocks.double() - blocks.double().transpose(-1, -2))) + 1e-8
    if bound > 0 and q_norm > bound:
        # Q = B - B^T is linear in B; fp32 at least, so the scaled blocks keep their digits.
        dtype = torch.promote_types(blocks.dtype, torch.float32)
        out["oft_blocks"] = (blocks.double() * (bound / q_norm)).to(dtype)
    out["alpha"] = torch.tensor(0.0, dtype=torch.float32)
    return out


def cayley(blocks: torch.Tensor, bound: float) -> torch.Tensor:
    """R - I for every block (any leading dims), in float64: R is within rounding of I for small Q,
    so keeping R - I instead of R avoids the cancellation a later `R @ W - W` would suffer."""
    q = blocks.double() - blocks.double().transpose(-1, -2)
    if bound > 0:
        q_norm = float(torch.linalg.vector_norm(q)) + 1e-8
        if q_norm > bound:
            q = q * (bound / q_norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    # (I + Q)(I - Q)^-1 == (I - Q)^-1 (I + Q) (both are functions of Q); minus I that is 2 (I - Q)^-1 Q.
    r: torch.Tensor = 2.0 * torch.linalg.solve(eye - q, q)
    return r


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    """fp32 parts for any whole blocks of the delta: "rot" R - I (n, b, b), "rescale" (out,) if any."""
    parts = {"rot": cayley(tensors["oft_blocks"], constraint(tensors)).float()}
    if "rescale" in tensors:
        parts["rescale"] = tensors["rescale"].reshape(-1).float()
    return parts


def row_align(parts: Tensors) -> int:
    """The block size, from `row_parts`' "rot" (or the file's "oft_blocks")."""
    return (parts["rot"] if "rot" in parts else parts["oft_blocks"]).shape[-1]


def _block_range(b: int, lo: int, hi: int) -> tuple[int, int]:
    if lo % b or hi % b:
        raise ValueError(f"OFT rows [{lo}, {hi}) cut its blocks of {b} rows; only whole blocks can be applied")
    return lo // b, hi // b


def _rotate(wx: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """wx (..., n * b) with each block k times rot[k] on the right: (R^T - I) applied to columns."""
    n, b, _ = rot.shape
    lead = wx.shape[:-1]
    return torch.einsum("tkn,knm->tkm", wx.reshape(-1, n, b), rot.to(wx.dtype)).reshape(*lead, n * b)


def _rotate_rows(w: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """(R^T - I) @ W_k for each block of rows of w (n * b, cols): one batched matmul, W untransposed."""
    n, b, _ = rot.shape
    return torch.bmm(rot.transpose(1, 2), w.reshape(n, b, -1)).reshape(w.shape)


def gain_shift(rescale: torch.Tensor | None, scale: float, n: int) -> dict[str, torch.Tensor]:
    """delta = gain * rotated + offset * W: gain = scale * rescale, offset = scale * (rescale - 1)."""
    # "offset", not "shift": prepared tensors become attributes of the dynamic slot, which has a shift().
    if rescale is None:
        return {"gain": torch.full((n,), float(scale))}
    return {"gain": rescale * scale, "offset": (rescale - 1.0) * scale}


def combine(rotated: torch.Tensor, w: torch.Tensor, t: Tensors) -> torch.Tensor:
    d = rotated * t["gain"].to(rotated.dtype)
    if "offset" in t:
        d = d + t["offset"].to(w.dtype) * w
    return d


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi) (whole blocks) of the fp32 delta from `weight` = W rows [lo, hi)."""
    if weight is None:
        raise ValueError("OFT's delta depends on the base weight")
    rot = parts["rot"]
    k0, k1 = _block_range(rot.shape[-1], lo, hi)
    w = weight.float()
    rescale = parts.get("rescale")
    gs = gain_shift(None if rescale is None else rescale[lo:hi], 1.0, hi - lo)
    return combine(_rotate_rows(w, rot[k0:k1]), w, {k: v[:, None] for k, v in gs.items()})


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The full fp32 delta rescale * R^T W - W (unscaled: the strength multiplies it)."""
    if weight is None:
        raise ValueError("OFT's delta depends on the base weight")
    return delta_block(row_parts(tensors), 0, weight.shape[0], weight=weight)


def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """("oft", fp32 tensors) for the placement's delta rows, which must be whole blocks: "rot" R - I
    of the kept blocks, "gain"/"offset" (scale and rescale folded), and the weight facts `bound` needs."""
    parts = row_parts(tensors)
    d0, n = placement.d0, placement.n
    k0, k1 = _block_range(parts["rot"].shape[-1], d0, d0 + n)
    rescale = parts.get("rescale")
    out = {"rot": parts["rot"][k0:k1].contiguous(),
           **gain_shift(None if rescale is None else rescale[d0 : d0 + n], scale, n)}
    return "oft", {**out, **_weight_facts(weight, parts["rot"].shape[-1])}


def _weight_facts(weight: torch.Tensor | None, b: int) -> dict[str, torch.Tensor]:
    """max over blocks and columns of ||W_k[:, j]||, and max |W| (0-d fp64), for `bound`."""
    if weight is None or not weight.numel():
        return {"w_colmax": torch.zeros((), dtype=torch.float64), "w_absmax": torch.zeros((), dtype=torch.float64)}
    w = weight.double()
    return {"w_colmax": w.reshape(-1, b, w.shape[-1]).norm(dim=1).max(), "w_absmax": w.abs().max()}


def add_(rows: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None, t: Tensors, alpha: Alpha) -> None:
    """rows += alpha * delta x, from wx = x @ W_rows^T (the base output without bias)."""
    assert wx is not None  # uses_wx: the dispatcher passes the base output
    rows.add_(combine(_rotate(wx, t["rot"]), wx, t) * alpha)


def bound(t: Tensors) -> float:
    """|gain * ((R - I)^T W)_mj + shift * W_mj| <= max|gain| ||(R - I)[:, m]|| ||W_k[:, j]|| + max|shift| max|W|
    (Cauchy-Schwarz; 1% slack for the rounding of R), fp64."""
    def amax(v: torch.Tensor) -> float:
        return float(v.double().abs().max()) if v.numel() else 0.0

    rot = t["rot"].double()
    col = float(rot.norm(dim=-2).max()) if rot.numel() else 0.0
    shift = amax(t["offset"]) * float(t["w_absmax"]) if "offset" in t else 0.0
    return 1.01 * amax(t["gain"]) * col * float(t["w_colmax"]) + shift


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x @ delta.T in x's dtype, unscaled, without the dense delta."""
    if weight is None:
        raise ValueError("OFT's delta depends on the base weight")
    wx = x @ weight.to(x.dtype).T
    rows = torch.zeros_like(wx)
    t = prepare(tensors, 1.0, Placement.of(None, None, weight.shape[0]), None)[1]
    add_(rows.reshape(-1, rows.shape[-1]), x, wx.reshape(-1, wx.shape[-1]), t, 1.0)
    return rows


def dynamic_numel(shapes: Shapes) -> int:
    n, b, _ = blocks_shape(shapes)
    return n * b * b + n * b * (2 if "rescale" in shapes else 1)


def describe(shapes: Shapes) -> str:
    n, b, _ = blocks_shape(shapes)
    return f"{n} rotations of {b}x{b}" + (" + rescale" if "rescale" in shapes else "")


def _claims(shapes: Shapes) -> bool:
    return len(shapes.get("oft_blocks", ())) == 3  # BOFT's are 4-D (LyCORIS tells them apart the same way)


KERNEL = Kernel(name="oft", add_=add_, bound=bound, uses_wx=True, probe=True)  # bound: Cauchy-Schwarz

ALGORITHM = Algorithm(
    name="oft", title="OFT", family="oft", priority=42, delta_shape=lambda s: (delta_shape(s)[0], None),
    rank=rank, delta=delta, bypass=bypass, row_parts=row_parts, delta_block=delta_block,
    dynamic_numel=dynamic_numel, describe=describe, needs_weight=True, row_align=row_align, prepare=prepare,
    kernels=(KERNEL,), claims=_claims, alpha_role="alpha", absolute_alpha_role=ABSOLUTE, canonical=canonical,
    unit_scale="OFT's alpha is its constraint, not a scale",
)
