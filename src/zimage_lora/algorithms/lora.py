"""LoRA: delta = up @ (mid @) down. Tensors: `down` (r, in), `up` (out, r), optional `mid` (r, r)."""

from __future__ import annotations

import torch

from ._shapes import as_matrix, matrix


def delta_shape(shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    r_down, n_in = matrix(shapes, "down")
    n_out, r_up = matrix(shapes, "up")
    r_in = r_down
    if "mid" in shapes:
        r_mid_out, r_mid_in = matrix(shapes, "mid")
        if r_mid_in != r_down:
            raise ValueError(f"'mid' takes {r_mid_in} inputs but 'down' gives rank {r_down}")
        r_in = r_mid_out
    if r_up != r_in:
        raise ValueError(f"rank mismatch: 'down' has rank {r_in} (rows), 'up' expects {r_up} (columns)")
    return n_out, n_in


def rank(shapes: dict[str, tuple[int, ...]]) -> int | None:
    return matrix(shapes, "down")[0]


def delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    down = as_matrix(tensors["down"]).float()
    up = as_matrix(tensors["up"]).float()
    if "mid" in tensors:
        down = as_matrix(tensors["mid"]).float() @ down
    return up @ down


def bypass(x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    h = x @ as_matrix(tensors["down"]).to(x.dtype).T
    if "mid" in tensors:
        h = h @ as_matrix(tensors["mid"]).to(x.dtype).T
    return h @ as_matrix(tensors["up"]).to(x.dtype).T


def row_parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 parts from which any block of rows of the delta is cheap: (up, down with mid folded in)."""
    down = as_matrix(tensors["down"]).float()
    if "mid" in tensors:
        down = as_matrix(tensors["mid"]).float() @ down
    return {"up": as_matrix(tensors["up"]).float(), "down": down}


def delta_block(parts: dict[str, torch.Tensor], lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the delta: a slice of up times down."""
    return parts["up"][lo:hi] @ parts["down"]
