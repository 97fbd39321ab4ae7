"""DoRA as a per-row factor, so neither merge nor forward needs more than the base weight once.

With V = W + s * dW and magnitude m (one value per output row), DoRA's weight is f * V with
f = m / ||V||_row. The user's strength t interpolates: W' = W + t * (f * V - W), so

    y = W x + t * ((f - 1) * (W x) + f * s * (dW x))

`dora_row_factor` returns f once; the forward only needs two per-row vectors. f depends on the whole
weight W under the adapter (merged deltas included), so a dynamic DoRA recomputes it whenever that
weight changes (`AdapterLinear.refresh_dora`).
"""

from __future__ import annotations

import torch

from .base import Kernel, Reserved


def dora_row_factor(
    weight: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, on_out: bool = True
) -> torch.Tensor:
    """f = m / ||W + s dW||, per output row (shape (out, 1)) or per input column (shape (1, in)), fp32."""
    v = weight.float() + scaled_delta.float()
    eps = torch.finfo(torch.float32).eps
    if on_out:
        f: torch.Tensor = magnitude.float().reshape(-1, 1) / (v.norm(dim=1, keepdim=True) + eps)
    else:
        f = magnitude.float().reshape(1, -1) / (v.norm(dim=0, keepdim=True) + eps)
    return f


def dora_merged(
    weight: torch.Tensor, scaled_delta: torch.Tensor, magnitude: torch.Tensor, strength: float, on_out: bool
) -> torch.Tensor:
    """W + t * (f * (W + s dW) - W) in fp32, for merging."""
    w = weight.float()
    v = w + scaled_delta.float()
    f = dora_row_factor(w, scaled_delta, magnitude, on_out)
    return w + strength * (f * v - w)


def fold_rows(
    kernel: Kernel, tensors: dict[str, torch.Tensor], weight: torch.Tensor, magnitude: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """Dynamic DoRA per output row on a kernel that can scale its rows: its tensors times f, plus
    "fm1" = f - 1 (the dispatcher adds alpha * (f - 1) * W x). None when the kernel cannot."""
    if kernel.scale_rows is None or kernel.dense is None:
        return None
    # The factors come from the CPU; the norm is taken where the weight lives (maybe a GPU).
    tensors = {k: v.to(weight.device) for k, v in tensors.items()}
    f = dora_row_factor(weight, kernel.dense(tensors), magnitude.to(weight.device))  # (n, 1)
    out: dict[str, torch.Tensor] = {k: v.contiguous() for k, v in kernel.scale_rows(tensors, f).items()}
    out[Reserved.DORA_FM1] = (f - 1).reshape(-1)
    return out


def dense_rows(
    scaled_delta: torch.Tensor, weight: torch.Tensor, magnitude: torch.Tensor, on_out: bool
) -> torch.Tensor:
    """The DoRA-adapted weight minus the weight, for the dense fallback: f * (W + s dW) - W, fp32."""
    delta = scaled_delta.to(weight.device)
    return dora_merged(weight, delta, magnitude.to(weight.device), 1.0, on_out) - weight
