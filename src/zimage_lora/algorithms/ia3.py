"""IA3 (LyCORIS `ia3`): one learned factor per output row, or per input column with `on_input`.

Tensors, as LyCORIS's IA3Module saves them (its default `state_dict`): `weight`, a vector of `out`
values (or `in` with `on_input`), and `on_input` (0-d; 1 = the vector scales the input columns).
No alpha: the scale is 1. LyCORIS merges W' = W * (1 + strength * weight) on the out axis
(rows) or the in axis (columns), so

    delta = W * weight[:, None]   (on output)      delta = W * weight[None, :]   (on_input)

which is linear in the strength, as LyCORIS's multiplier is. Note LyCORIS's *bypass* forward scales
the base output including its bias, (W x + bias) * (1 + s w), while its merge and its default
forward leave the bias alone; this module follows the merge (the bias is not scaled).

The `on_input` flag is a value, not a shape: on a square layer only it tells rows from columns, so
`delta_shape` cannot know the delta's shape and returns (0, 0); `check_weight` (tensors and the
weight's shape) is the real check. Rows [lo, hi) of the delta need the same rows of W.
Dynamic mode never builds the delta: on output, delta x = scale * weight * wx (wx the base output
without its bias, kernel "ia3"); on input, the base layer runs on x + scale * weight * x (kernel
"ia3_in", a `transform`, whole placements only; others take the dense fallback).
"""

from __future__ import annotations

import math

import torch

from ..placement import Placement
from ._shapes import matrix
from .base import Algorithm, Alpha, Kernel, Shapes, Tensors


def is_on_input(tensors: Tensors) -> bool:
    flag = tensors.get("on_input")
    return flag is not None and bool(flag.reshape(-1)[0] != 0)


def _length(shapes: Shapes) -> int:
    if "weight" not in shapes:
        raise ValueError("IA3 needs 'weight'")
    shape = tuple(shapes["weight"])
    if len(shape) != 1:
        raise ValueError(f"IA3 'weight' must be a vector, found shape {list(shape)}")
    return shape[0]


def delta_shape(shapes: Shapes) -> tuple[int, int]:
    """(0, 0): the weight's own shape; which side the vector scales is a value (`check_weight`)."""
    _length(shapes)
    return 0, 0


def check_weight(tensors: Tensors, weight_shape: tuple[int, ...]) -> None:
    out, n_in = matrix({"weight": weight_shape}, "weight")
    n = _length({"weight": tuple(tensors["weight"].shape)})
    want, axis = (n_in, "input columns") if is_on_input(tensors) else (out, "output rows")
    if n != want:
        raise ValueError(f"IA3 'weight' has {n} values, the layer has {want} {axis}")


def rank(shapes: Shapes) -> int | None:
    return None


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    return {"cols" if is_on_input(tensors) else "rows": tensors["weight"].float()}


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi) of the fp32 delta from `weight` = W rows [lo, hi)."""
    if weight is None:
        raise ValueError("IA3's delta depends on the base weight")
    if "cols" in parts:
        return weight.float() * parts["cols"]
    return weight.float() * parts["rows"][lo:hi, None]


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        raise ValueError("IA3's delta depends on the base weight")
    return delta_block(row_parts(tensors), 0, weight.shape[0], weight=weight)


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    if weight is None:
        raise ValueError("IA3's delta depends on the base weight")
    v, w = tensors["weight"].to(x.dtype), weight.to(x.dtype)
    return (x * v) @ w.T if is_on_input(tensors) else (x @ w.T) * v


def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """On output: ("ia3", {"rows": scale * weight[kept rows]}); on input and a whole placement:
    ("ia3_in", {"cols": scale * weight}); else None (the dense fallback). Plus max|W| for `bound`."""
    v = tensors["weight"].float() * scale
    facts = {"w_absmax": weight.double().abs().max() if weight is not None and weight.numel()
             else torch.zeros((), dtype=torch.float64)}
    if not is_on_input(tensors):
        return "ia3", {"rows": v[placement.d0 : placement.d0 + placement.n].contiguous(), **facts}
    if placement.whole:
        return "ia3_in", {"cols": v.contiguous(), **facts}
    return None


def add_(rows: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None, t: Tensors, alpha: Alpha) -> None:
    """Kernel "ia3": rows += alpha * rows-scale * wx (wx = x @ W_rows^T, no bias)."""
    assert wx is not None  # uses_wx: the dispatcher passes the base output
    rows.add_(wx * (t["rows"].to(wx.dtype) * alpha))


def transform(x: torch.Tensor, t: Tensors) -> torch.Tensor:
    """Kernel "ia3_in": the base runs on x + alpha * x * cols."""
    return x * t["cols"].to(x.dtype)


def bound(t: Tensors) -> float:
    """Each delta value is one product: max|scale * weight| * max|W|, fp64."""
    v = t["rows"] if "rows" in t else t["cols"]
    return (float(v.double().abs().max()) if v.numel() else 0.0) * float(t["w_absmax"])


def dynamic_numel(shapes: Shapes) -> int:
    return math.prod(shapes["weight"])


def describe(shapes: Shapes) -> str:
    return f"{_length(shapes)} channel scales"


def _check(shapes: Shapes, weight_shape: tuple[int, int], values: Tensors | None) -> None:
    """The protocol's check: exact once the flag is read; before, the vector must fit one side."""
    if values is not None:
        check_weight(values, weight_shape)
        return
    n, (out, n_in) = _length(shapes), weight_shape
    if n not in (out, n_in):
        raise ValueError(f"IA3 'weight' has {n} values, the layer has {out} output rows and {n_in} input columns")


def split_rows(tensors: Tensors, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows [lo, hi) of a fused delta: the vector's rows on output; the same vector on input."""
    return dict(tensors) if is_on_input(tensors) else {**tensors, "weight": tensors["weight"][lo:hi]}


# `bound` is max|v| max|W|, not the max of the products: the exact check probes the kernel instead.
KERNELS = (
    Kernel(name="ia3", add_=add_, bound=bound, uses_wx=True, probe=True),
    Kernel(name="ia3_in", add_=lambda rows, x, wx, t, alpha: None, bound=bound, transform=transform, probe=True),
)

ALGORITHM = Algorithm(
    name="ia3", title="IA3", family="ia3", priority=41, delta_shape=lambda s: (_length(s) and None, None),
    rank=rank, delta=delta, bypass=bypass, row_parts=row_parts, delta_block=delta_block, split_rows=split_rows,
    dynamic_numel=dynamic_numel, describe=describe, needs_weight=True, prepare=prepare, kernels=KERNELS,
    check_weight=_check, value_roles=("on_input",), unit_scale="IA3 has no alpha",
)
