"""BOFT in PEFT's form (`BOFTConfig`): butterfly rotations of a Linear's *input*, then a per-output scale.

Tensors, as PEFT's BOFTLayer saves them (`save_pretrained`, the adapter name stripped):
- `boft_R` (m, n, b, b): m butterfly stages (`boft_n_butterfly_factor`) of n blocks of b inputs.
  R = (I - S)(I + S)^-1 per block with S = (B - B^T) / 2 (PEFT `cayley_batch`, the exact transform);
- `boft_s` (out, 1): a scale of each output row.

Stage i is M_i = P_i blockdiag(R_i) P_i^T with P_i PEFT's block butterfly permutation
(`BOFTLayer.block_butterfly_perm`, restated in `_order`): the inputs in groups of b 2^i, each group
cut into chunks of b / 2, read even chunks first, then odd ones (stage 0: the identity). PEFT multiplies
M = M_{m-1} ... M_0, runs the layer on x @ M and scales the output rows (bias excluded):

    W' = s * (W M^T),  delta = s * (W M^T) - W,  linear in the strength (W + t * delta).

(PEFT trains m > 1 only with its CUDA block-diagonal extension; the files are the same.) No alpha, no
rank: scale 1. Rows of the delta need the same rows of W and of s. Dynamic mode: when every s is 1
the base layer runs on the rotated input x + t (x M - x) (one stage: `algorithms/oft_input.py`'s
kernel; more: kernel "boft_in", stage by stage, no dense delta); with a row scale a single base call
cannot stay linear in the strength, so those targets take the dense fallback (the cached delta rows).
"""

from __future__ import annotations

import functools

import torch

from ..placement import Placement
from . import oft_input
from .base import Algorithm, Kernel, Shapes, Tensors


def blocks(shapes: Shapes) -> tuple[int, int, int]:
    """(m, n, b) from `boft_R`, checked: several stages need even blocks, n a multiple of 2^(m-1)."""
    shape = tuple(shapes.get("boft_R", ()))
    if len(shape) != 4 or shape[-1] != shape[-2] or 0 in shape:
        raise ValueError(f"'boft_R' must be (stages, blocks, b, b), found shape {list(shape)}")
    m, n, b = shape[0], shape[1], shape[2]
    if m > 1 and (b % 2 or n % (2 ** (m - 1))):
        raise ValueError(f"'boft_R' {list(shape)}: {m} butterfly stages need an even block size and a number "
                         f"of blocks divisible by {2 ** (m - 1)} (PEFT BOFTLayer.update_layer)")
    return m, n, b


@functools.lru_cache(maxsize=256)
def _order(n_in: int, b: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage `stage`'s permutation as indices, and its inverse: column c of x @ P^T is column order[c]
    of x, column c of x @ P is column inverse[c]."""
    half = b // 2
    # Groups of b 2^stage inputs, as 2^stage pairs of chunks of b/2: the even chunk of each pair first.
    order = torch.arange(n_in).reshape(-1, 2**stage, 2, half).transpose(1, 2).reshape(-1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n_in)
    return order, inverse


def butterfly(x: torch.Tensor, rot: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x @ M - x (or x @ M^T - x) for x (..., in), rot = R - I per stage (m, n, b, b), in x's dtype;
    the stages' differences are summed, so it keeps its digits when M is near I."""
    m, n, b, _ = rot.shape
    rot = rot.to(x.dtype)
    lead, n_in = x.shape[:-1], x.shape[-1]
    cur = x.reshape(-1, n_in)
    d = torch.zeros_like(cur)
    # x @ M applies M_{m-1} first; x @ M^T = x @ M_0^T ... M_{m-1}^T applies stage 0 first, transposed.
    for i in (range(m) if transpose else reversed(range(m))):
        order, inverse = (o.to(x.device) for o in _order(n_in, b, i))
        r = rot[i].transpose(-1, -2) if transpose else rot[i]
        # x @ P_i is x[:, inverse]; rotate its blocks; @ P_i^T takes columns `order` of that.
        y = torch.einsum("tkb,kbc->tkc", cur[:, inverse].reshape(-1, n, b), r).reshape(cur.shape)
        c = y[:, order]
        cur, d = cur + c, d + c
    return d.reshape(*lead, n_in)


def delta_shape(shapes: Shapes) -> tuple[int | None, int]:
    _m, n, b = blocks(shapes)
    return (shapes["boft_s"][0] if "boft_s" in shapes else None), n * b


def rotation(tensors: Tensors) -> torch.Tensor:
    """R - I per stage and block (m, n, b, b), float64: -2 S (I + S)^-1 for S = (B - B^T) / 2."""
    raw = tensors["boft_R"].double()
    s = 0.5 * (raw - raw.transpose(-1, -2))
    eye = torch.eye(s.shape[-1], dtype=s.dtype).expand_as(s)
    r: torch.Tensor = torch.linalg.solve(eye + s, -2.0 * s, left=False)
    return r


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    parts = {"rot_in": rotation(tensors).float()}
    if "boft_s" in tensors:
        parts["row_scale"] = tensors["boft_s"].reshape(-1).float()
    return parts


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi): s * (W + (W M^T - W)) - W from `weight` = W rows [lo, hi)."""
    if weight is None:
        raise ValueError("BOFT's delta depends on the base weight")
    w = weight.float()
    rotated = w + butterfly(w, parts["rot_in"], transpose=True)
    if "row_scale" not in parts:
        return rotated - w
    return parts["row_scale"][lo:hi, None] * rotated - w


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        raise ValueError("BOFT's delta depends on the base weight")
    return delta_block(row_parts(tensors), 0, weight.shape[0], weight=weight)


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        raise ValueError("BOFT's delta depends on the base weight")
    return x @ delta(tensors, weight).to(x.dtype).T


def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """The input-rotation kernel when no row is scaled and the placement is whole (one stage: the
    strength folds into R - I, `oft_input`'s kernel; several: "boft_in" with the strength as `gain`);
    else the dense fallback."""
    if not placement.whole or ("boft_s" in tensors and not bool((tensors["boft_s"] == 1).all())):
        return None
    rot = rotation(tensors).float()
    if rot.shape[0] == 1:
        rot1 = (rot[0] * scale).contiguous()
        return oft_input.KERNEL.name, {"rot_in": rot1, **oft_input.weight_facts(weight, rot.shape[-1])}
    facts = {"w_rowmax": (weight.double().norm(dim=1).max() if weight is not None and weight.numel()
                          else torch.zeros((), dtype=torch.float64))}
    return KERNEL.name, {"rot_in": rot.contiguous(), "gain": torch.tensor(float(scale)), **facts}


def transform(x: torch.Tensor, t: Tensors) -> torch.Tensor:
    """Kernel "boft_in": the base runs on x + alpha * g(x), g(x) = gain * (x @ M - x)."""
    return butterfly(x, t["rot_in"]) * t["gain"].to(x.dtype)


def bound(t: Tensors) -> float:
    """|delta_ij| = |gain W[i] . (M^T - I)[:, j]| <= |gain| ||W[i]|| ||M - I||_2, and ||M - I||_2 is at most 2
    (M orthogonal) and at most prod(1 + e_i) - 1 (e_i the largest Frobenius norm of stage i's R - I
    blocks); 1% slack for rounding. fp64."""
    rot = t["rot_in"].double()
    grow = float(torch.prod(1.0 + rot.flatten(2).norm(dim=2).amax(dim=1))) - 1.0 if rot.numel() else 0.0
    return 1.01 * min(2.0, grow) * abs(float(t["gain"])) * float(t["w_rowmax"])


def split_rows(tensors: Tensors, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) of a fused delta: the same rotation, the rows' own scales."""
    out = dict(tensors)
    if "boft_s" in out:
        out["boft_s"] = out["boft_s"][lo:hi]
    return out


def check_weight(shapes: Shapes, weight_shape: tuple[int, ...], values: Tensors | None = None) -> None:
    _m, n, b = blocks(shapes)
    if n * b != weight_shape[1]:
        raise ValueError(f"'boft_R' rotates {n} blocks of {b} inputs ({n * b}), the weight has {weight_shape[1]}")


def dynamic_numel(shapes: Shapes) -> int:
    m, n, b = blocks(shapes)
    return m * n * b * b


def describe(shapes: Shapes) -> str:
    m, n, b = blocks(shapes)
    stages = f"butterfly of {m} stages x " if m > 1 else ""
    return f"{stages}{n} input rotations of {b}x{b}" + (" + output scale" if "boft_s" in shapes else "")


# `bound` is not exact (Cauchy-Schwarz): the exact check probes the kernel on the base weight.
KERNEL = Kernel(name="boft_in", add_=lambda rows, x, wx, t, alpha: None, bound=bound, transform=transform, probe=True)


ALGORITHM = Algorithm(
    name="boft-input", title="BOFT (PEFT, input rotation)", family="boft_r", priority=45, delta_shape=delta_shape,
    rank=lambda shapes: None, delta=delta, bypass=bypass, row_parts=row_parts, delta_block=delta_block,
    dynamic_numel=dynamic_numel, describe=describe, needs_weight=True, prepare=prepare, split_rows=split_rows,
    check_weight=check_weight, kernels=(KERNEL,), unit_scale="BOFT has no alpha",
)
