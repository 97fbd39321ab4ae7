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
callers read it (`is_on_input`) before validating. Rows: rows [lo, hi) need the same rows of W.
Dynamic mode never builds the delta: on output, delta x = weight * y with y the base output
without its bias; on input, the base layer runs on x + c * weight * x (one base matmul).
"""

from __future__ import annotations

import math

import torch

from ._shapes import matrix


def is_on_input(tensors: dict[str, torch.Tensor]) -> bool:
    flag = tensors.get("on_input")
    return flag is not None and bool(flag.reshape(-1)[0] != 0)


def _length(shapes: dict[str, tuple[int, ...]]) -> int:
    if "weight" not in shapes:
        raise ValueError("IA3 needs 'weight'")
    shape = tuple(shapes["weight"])
    if len(shape) != 1:
        raise ValueError(f"IA3 'weight' must be a vector, found shape {list(shape)}")
    return shape[0]


def delta_shape(shapes: dict[str, tuple[int, ...]], weight_shape: tuple[int, ...], on_input: bool) -> tuple[int, int]:
    out, n_in = matrix({"weight": weight_shape}, "weight")
    n = _length(shapes)
    want, axis = (n_in, "input columns") if on_input else (out, "output rows")
    if n != want:
        raise ValueError(f"IA3 'weight' has {n} values, the layer has {want} {axis}")
    return out, n_in


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return None


def row_parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    w = tensors["weight"].float()
    return {"cols" if is_on_input(tensors) else "rows": w}


def row_span(shapes: dict[str, tuple[int, ...]], lo: int, hi: int) -> tuple[int, int]:
    return lo, hi


def delta_block(parts: dict[str, torch.Tensor], w_rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the fp32 delta from `w_rows` = W[lo:hi]."""
    if "cols" in parts:
        return w_rows.float() * parts["cols"]
    return w_rows.float() * parts["rows"][lo:hi, None]


def delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    return delta_block(row_parts(tensors), weight, 0, weight.shape[0])


def prepare(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) for k, v in row_parts(tensors).items()}


def input_delta(x: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """on_input: the change to the base layer's input, unscaled (x * weight); else None."""
    return x * parts["cols"] if "cols" in parts else None


def output_delta(y: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """On output: delta @ x from the base output without its bias (y * weight); else None."""
    return y * parts["rows"] if "rows" in parts else None


def forward(x: torch.Tensor, base, bias: torch.Tensor | None, parts: dict[str, torch.Tensor], c: float) -> torch.Tensor:
    """The adapted layer's output at scale c; `base` is the layer's own forward (weight and bias)."""
    if "cols" in parts:
        return base(x + c * input_delta(x, parts))
    y = base(x)
    plain = y if bias is None else y - bias
    return y + c * output_delta(plain, parts)


def abs_bound(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> float:
    """|delta| <= max|weight| * max|W| (each value is one product)."""
    w, v = weight.double(), tensors["weight"].double()
    if not w.numel() or not v.numel():
        return 0.0
    return float(v.abs().max()) * float(w.abs().max())


def dynamic_bytes(shapes: dict[str, tuple[int, ...]], element_size: int) -> int:
    return math.prod(shapes["weight"]) * element_size
