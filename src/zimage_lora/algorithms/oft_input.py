"""OFT v2 (PEFT `OFTConfig`, OneTrainer OFT_2): block-diagonal rotations of a Linear's *input*.

Tensors, as PEFT's OFTRotationModule and OneTrainer's copy of it (modules/module/oft_utils.py) save
them under `<module>.oft_R`:
- `oft_R` (r, b(b-1)/2): per block, the strict upper triangle of a b x b matrix, row by row
  (`triu_indices(b, b, 1)`); the skew block is Q = U - U^T. One row for r blocks when the rotation is
  shared (`block_share`: r == 1, the input is a multiple of b);
- `scaled` (0-d bool, optional; OneTrainer's `oft_R.scaled_oft` buffer): the rows were divided by
  2 sqrt(b - 1) before Q is built ("scaled OFT").

R is the Cayley transform by its Neumann series with 5 terms (both writers' default,
`num_cayley_neumann_terms=5`): R = I + 2Q + 2Q^2 + 2Q^3 + Q^4. The layer runs on the rotated input,
x_k -> x_k R_k per block (einsum "...rk,rkc->...rc"), so W' = W R^T (block-diagonal R) and

    delta = W (R^T - I),  linear in the strength (W + t * delta).

No alpha, no rank: scale 1. Rows of the delta need only the same rows of W (any row split works).
Dynamic mode never builds the delta: the base layer runs on x + t * g(x), g(x)_k = x_k (R_k - I)
(kernel "oft_in", a `transform`, whole placements); a placement that is part of a fused layer takes
the dense fallback.
"""

from __future__ import annotations

import math

import torch

from ..placement import Placement
from .base import Algorithm, Kernel, Shapes, Tensors

TERMS = 5  # num_cayley_neumann_terms, PEFT's and OneTrainer's default


def block_size(shapes: Shapes) -> tuple[int, int]:
    """(r, b) from `oft_R`'s shape (r, b(b-1)/2), checked."""
    shape = tuple(shapes.get("oft_R", ()))
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"'oft_R' must be (blocks, b(b-1)/2), found shape {list(shape)}")
    r, n = shape
    b = (1 + math.isqrt(1 + 8 * n)) // 2
    if b * (b - 1) // 2 != n:
        raise ValueError(f"'oft_R' rows hold {n} values, not the upper triangle of a square block (b(b-1)/2)")
    return r, b


def delta_shape(shapes: Shapes) -> tuple[int | None, int | None]:
    """(None, r * b): the output is the weight's own; a shared block (r == 1) leaves the input open too."""
    r, b = block_size(shapes)
    return None, (None if r == 1 else r * b)


def check_weight(shapes: Shapes, weight_shape: tuple[int, ...], values: Tensors | None = None) -> None:
    r, b = block_size(shapes)
    n_in = weight_shape[1]
    if r * b != n_in and not (r == 1 and n_in % b == 0):
        raise ValueError(f"'oft_R' holds {r} rotations of {b} inputs ({r * b}), the weight has {n_in} inputs")


def rotation(tensors: Tensors) -> torch.Tensor:
    """R - I for every block (r, b, b), float64, from the packed rows (and OneTrainer's scaled flag)."""
    packed = tensors["oft_R"].double()
    r, b = block_size({"oft_R": packed.shape})
    if "scaled" in tensors and bool(tensors["scaled"].reshape(-1)[0]):
        packed = packed / (2.0 * math.sqrt(b - 1))  # OneTrainer OFTRotationModule.forward, oft_scaled
    rows, cols = torch.triu_indices(b, b, 1)
    upper = torch.zeros(r, b, b, dtype=torch.float64)
    upper[:, rows, cols] = packed
    q = upper - upper.transpose(1, 2)
    # Neumann series of (I + Q)(I - Q)^-1 with TERMS terms: 2 Q^k for k < TERMS - 1, then Q^(TERMS-1).
    out, power = torch.zeros_like(q), torch.eye(b, dtype=q.dtype).expand_as(q)
    for k in range(1, TERMS):
        power = power @ q
        out = out + (2.0 if k < TERMS - 1 else 1.0) * power
    return out


def _blocks(rot: torch.Tensor, n_in: int) -> torch.Tensor:
    """The rotation per input block: a shared one repeated over n_in / b blocks."""
    b = rot.shape[-1]
    return rot.expand(n_in // b, b, b) if rot.shape[0] == 1 else rot


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    return {"rot_in": rotation(tensors).float()}


def _rotate_input(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x (..., in) -> x_k @ rot_k per block of b inputs."""
    b = rot.shape[-1]
    rot = _blocks(rot, x.shape[-1])
    lead = x.shape[:-1]
    return torch.einsum("tkb,kbc->tkc", x.reshape(-1, rot.shape[0], b), rot.to(x.dtype)).reshape(*lead, x.shape[-1])


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi) of W (R^T - I) from `weight` = W rows [lo, hi): row w becomes w (R - I)^T per block."""
    if weight is None:
        raise ValueError("OFT's delta depends on the base weight")
    return _rotate_input(weight.float(), parts["rot_in"].transpose(-1, -2))


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        raise ValueError("OFT's delta depends on the base weight")
    return delta_block(row_parts(tensors), 0, weight.shape[0], weight=weight)


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    """x @ delta.T = g(x) @ W^T, in x's dtype, unscaled."""
    if weight is None:
        raise ValueError("OFT's delta depends on the base weight")
    return _rotate_input(x, rotation(tensors).to(x.dtype)) @ weight.to(x.dtype).T


def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """("oft_in", {"rot_in": scale * (R - I)}) for a whole placement, plus the weight facts `bound`
    needs; else None (the dense fallback: rows of a fused layer cannot rotate the shared input)."""
    if not placement.whole:
        return None
    rot = (rotation(tensors) * scale).float()
    return "oft_in", {"rot_in": rot.contiguous(), **weight_facts(weight, rot.shape[-1])}


def weight_facts(weight: torch.Tensor | None, b: int) -> dict[str, torch.Tensor]:
    """max over rows and input blocks of ||W[i, block]||, fp64, for `bound`."""
    if weight is None or not weight.numel():
        return {"w_blockmax": torch.zeros((), dtype=torch.float64)}
    w = weight.double()
    return {"w_blockmax": w.reshape(w.shape[0], -1, b).norm(dim=-1).max()}


def transform(x: torch.Tensor, t: Tensors) -> torch.Tensor:
    """Kernel "oft_in": the base runs on x + alpha * g(x), g(x)_k = x_k (R_k - I) (scale folded in)."""
    return _rotate_input(x, t["rot_in"])


def bound(t: Tensors) -> float:
    """|delta_ij| = |W[i, block k] . (R_k - I)[:, j]| <= ||W[i, block]|| max ||(R - I) column|| (Cauchy-Schwarz;
    1% slack for rounding), fp64."""
    rot = t["rot_in"].double()
    col = float(rot.norm(dim=-2).max()) if rot.numel() else 0.0
    return 1.01 * col * float(t["w_blockmax"])


def dynamic_numel(shapes: Shapes) -> int:
    r, b = block_size(shapes)
    return r * b * b


def describe(shapes: Shapes) -> str:
    r, b = block_size(shapes)
    what = "one shared input rotation" if r == 1 else f"{r} input rotations"
    return f"{what} of {b}x{b}" + (" (scaled OFT)" if "scaled" in shapes else "")


# `bound` is not exact (Cauchy-Schwarz): the exact check probes the kernel on the base weight.
KERNEL = Kernel(name="oft_in", add_=lambda rows, x, wx, t, alpha: None, bound=bound, transform=transform, probe=True)

ALGORITHM = Algorithm(
    name="oft-input", title="OFT (input rotation)", family="oft_r", priority=44, delta_shape=delta_shape,
    rank=lambda shapes: None, delta=delta, bypass=bypass, row_parts=row_parts, delta_block=delta_block,
    dynamic_numel=dynamic_numel, describe=describe, needs_weight=True, prepare=prepare, kernels=(KERNEL,),
    check_weight=check_weight, value_roles=("scaled",), unit_scale="OFT has no alpha",
    split_rows=lambda tensors, lo, hi: dict(tensors),  # rows of the delta need only the same rows of W
)
