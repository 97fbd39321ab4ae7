"""BOFT in PEFT's form (`BOFTConfig`): block rotations of a Linear's *input*, then a per-output scale.

Tensors, as PEFT's BOFTLayer saves them (`save_pretrained`, the adapter name stripped):
- `boft_R` (m, n, b, b): m butterfly stages of n blocks; only m == 1 (`boft_n_butterfly_factor=1`,
  the only factor PEFT trains without its CUDA extension, and the default) is applied here: its
  butterfly permutation is the identity. R = (I - S)(I + S)^-1 per block with S = (B - B^T) / 2
  (PEFT `cayley_batch`, the exact transform);
- `boft_s` (out, 1): a scale of each output row.

PEFT runs the layer on x @ blockdiag(R) and scales the output rows (bias excluded): W' = s * (W R^T),

    delta = s * (W R^T) - W,  linear in the strength (W + t * delta).

No alpha, no rank: scale 1. Rows of the delta need the same rows of W and of s. Dynamic mode: when
every s is 1 the base layer runs on the rotated input (the input-rotation kernel of
`algorithms/oft_input.py`, no dense delta); with a row scale a single base call cannot stay linear
in the strength, so those targets take the dense fallback (the cached scaled delta rows).
"""

from __future__ import annotations

import torch

from ..placement import Placement
from . import oft_input
from .base import Algorithm, Shapes, Tensors


def blocks(shapes: Shapes) -> tuple[int, int, int]:
    """(m, n, b) from `boft_R`, checked (m == 1: see the module docstring)."""
    shape = tuple(shapes.get("boft_R", ()))
    if len(shape) != 4 or shape[-1] != shape[-2] or 0 in shape:
        raise ValueError(f"'boft_R' must be (stages, blocks, b, b), found shape {list(shape)}")
    if shape[0] != 1:
        raise ValueError(_stages(shape[0]))
    return shape[0], shape[1], shape[2]


def _stages(m: int) -> str:
    return (f"BOFT in PEFT's form with {m} butterfly stages (BOFTConfig boft_n_butterfly_factor={m}); only 1 is "
            "applied (the stages' permutations are PEFT's, not in the file)")


def unsupported(shapes: Shapes) -> str | None:
    shape = tuple(shapes.get("boft_R", ()))
    return _stages(shape[0]) if len(shape) == 4 and shape[0] != 1 else None


def delta_shape(shapes: Shapes) -> tuple[int | None, int]:
    _m, n, b = blocks(shapes)
    return (shapes["boft_s"][0] if "boft_s" in shapes else None), n * b


def rotation(tensors: Tensors) -> torch.Tensor:
    """R - I per block (n, b, b), float64: -2 S (I + S)^-1 for S = (B - B^T) / 2."""
    raw = tensors["boft_R"].double()[0]
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
    """Rows [lo, hi): s * (W + W (R - I)^T) - W from `weight` = W rows [lo, hi)."""
    if weight is None:
        raise ValueError("BOFT's delta depends on the base weight")
    w = weight.float()
    rotated = w + oft_input.delta_block(parts, lo, hi, weight=w)
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
    """The input-rotation kernel when no row is scaled and the placement is whole; else the dense fallback."""
    if not placement.whole or ("boft_s" in tensors and not bool((tensors["boft_s"] == 1).all())):
        return None
    rot = (rotation(tensors) * scale).float()
    return oft_input.KERNEL.name, {"rot_in": rot.contiguous(), **oft_input.weight_facts(weight, rot.shape[-1])}


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
    _m, n, b = blocks(shapes)
    return n * b * b


def describe(shapes: Shapes) -> str:
    _m, n, b = blocks(shapes)
    return f"{n} input rotations of {b}x{b}" + (" + output scale" if "boft_s" in shapes else "")


ALGORITHM = Algorithm(
    name="boft-input", title="BOFT (PEFT, input rotation)", family="boft_r", priority=45, delta_shape=delta_shape,
    rank=lambda shapes: None, delta=delta, bypass=bypass, row_parts=row_parts, delta_block=delta_block,
    dynamic_numel=dynamic_numel, describe=describe, needs_weight=True, prepare=prepare, split_rows=split_rows,
    check_weight=check_weight, unsupported=unsupported, unit_scale="BOFT has no alpha",
)
