"""Full weight and bias differences: `diff` (out, in) and/or `diff_b` (out,)."""

from __future__ import annotations

import torch

from .base import Algorithm, RowPart, Shapes, Tensors


def delta_shape(shapes: Shapes) -> tuple[int, int]:
    if "diff" in shapes:
        shape = tuple(shapes["diff"])
        if len(shape) == 2:
            return shape[0], shape[1]
        if len(shape) == 1:  # a norm's weight: (n,) acts as an (n, 1) column for shape checks
            return shape[0], 1
        raise ValueError(f"'diff' must be 1-D or 2-D, found shape {list(shape)}")
    if "diff_b" in shapes:
        return tuple(shapes["diff_b"])[0], 0
    raise ValueError("a full diff needs 'diff' or 'diff_b'")


def rank(shapes: Shapes) -> int | None:
    return None


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    return tensors["diff"].float()


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    return x @ tensors["diff"].to(x.dtype).T


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    return {"diff": tensors["diff"].float()} if "diff" in tensors else {}


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    return parts["diff"][lo:hi]


def dynamic_numel(shapes: Shapes) -> int:
    n = 1
    for d in shapes.get("diff", (0,)):
        n *= d
    return n


def describe(shapes: Shapes) -> str:
    return "x".join(map(str, shapes["diff"])) if "diff" in shapes else "bias only"


def fuse_rows(parts: list[RowPart | None]) -> tuple[dict[str, torch.Tensor], float, None] | None:
    """q, k, v diffs stacked on the fused rows (zeros for a missing block); None if one has no diff."""
    present = [p for p in parts if p is not None]
    if any("diff" not in t for t, _, _ in present):
        return None
    ref = present[0][0]["diff"]
    return {"diff": torch.cat([p[0]["diff"] if p is not None else torch.zeros_like(ref) for p in parts], 0)}, 1.0, None


ALGORITHM = Algorithm(
    name="full", title="full diffs", family="full", priority=90, delta_shape=delta_shape, rank=rank,
    delta=delta, bypass=bypass,
    row_parts=row_parts, delta_block=delta_block, dynamic_numel=dynamic_numel, describe=describe,
    has_weight=lambda tensors: "diff" in tensors, fuse_rows=fuse_rows,
)
