"""Merging canonical `Target`s into dense fp32 tensors: the per-tensor step of a checkpoint merge.

The same row-block merge as the engine's merged mode (`apply.rows`), applied to a tensor read from a
checkpoint instead of a module's weight: rows / delta_rows placement, DoRA, bias diffs. Everything
is fp32; the caller rounds once into the output dtype.
"""

from __future__ import annotations

import torch

from ..adapter import Target
from ..apply.rows import MergeFactors, add_rows, add_scaled_


def _factors(
    targets: list[tuple[Target, float]], out_features: int, device: torch.device | None
) -> list[tuple[MergeFactors, float]]:
    return [(MergeFactors(t, out_features, device), s) for t, s in targets]


def merge_weight(weight: torch.Tensor, targets: list[tuple[Target, float]]) -> torch.Tensor:
    """`weight` (fp32, modified in place and returned) with each (target, strength) merged in order.

    LoRA-family: W += strength * scale * delta. DoRA: W' = W + t * (m * V / ||V|| - W), V = W + scale * delta.
    A `rows` target changes only those rows.
    """
    # Shapes were validated when the adapters were resolved against the checkpoint's inventory.
    weighted = [(p, s) for p, s in _factors(targets, weight.shape[0], weight.device) if p.has_weight_delta]
    if weight.dim() == 1:  # a norm's weight: the diff is a vector
        for p, s in weighted:
            add_scaled_(weight, p.parts["diff"].reshape(-1), p.target.scale, s)
        return weight
    add_rows(weight, 0, weighted)
    return weight


def merge_bias(bias: torch.Tensor, targets: list[tuple[Target, float]]) -> torch.Tensor:
    """`bias` (fp32, in place) plus strength * diff_b of each target (bias diffs carry no alpha scale).
    That each diff fits was checked before anything was written (`shapes.check_bias`)."""
    for p, s in _factors(targets, bias.shape[0], bias.device):
        placed = p.bias_delta()
        if placed is None:
            continue
        lo, hi, diff_b = placed
        bias[lo:hi].add_(diff_b, alpha=s)
    return bias
