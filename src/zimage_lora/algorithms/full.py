"""Full weight and bias differences: `diff` (out, in) and/or `diff_b` (out,)."""

from __future__ import annotations

import torch


def delta_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
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


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return None


def delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors["diff"].float()


def bypass(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return x @ tensors["diff"].to(x.dtype).T


def row_parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"diff": tensors["diff"].float()} if "diff" in tensors else {}


def delta_block(parts: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    return parts["diff"][lo:hi]
