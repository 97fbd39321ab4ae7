"""Merging canonical `Target`s into dense fp32 tensors: the per-tensor step of a checkpoint merge.

Pure functions on tensors (no modules): rows / delta_rows slicing, DoRA, bias diffs. Everything is
fp32; the caller rounds once into the output dtype.
"""

from __future__ import annotations

import torch

from .. import algorithms
from ..adapter import Target
from ..algorithms.dora import dora_merged


def weight_delta(target: Target) -> torch.Tensor | None:
    """The unscaled fp32 delta of the rows the target covers (None for a bias-only diff)."""
    factors = {k: v for k, v in target.tensors.items() if k != "diff_b"}
    if target.algorithm == "full" and "diff" not in factors:
        return None
    delta = algorithms.delta(target.algorithm, factors)
    if target.delta_rows is not None:
        a, b = target.delta_rows
        delta = delta[a:b]
    return delta


def bias_delta(target: Target) -> torch.Tensor | None:
    diff_b = target.tensors.get("diff_b")
    if diff_b is None:
        return None
    diff_b = diff_b.float().reshape(-1)
    if target.delta_rows is not None:
        a, b = target.delta_rows
        diff_b = diff_b[a:b]
    return diff_b


def merge_weight(weight: torch.Tensor, targets: list[tuple[Target, float]]) -> torch.Tensor:
    """`weight` (fp32, modified in place and returned) with each (target, strength) merged in order.

    LoRA-family: W += strength * scale * delta. DoRA: W' = W + t * (m * V / ||V|| - W), V = W + scale * delta.
    A `rows` target changes only those rows.
    """
    for target, strength in targets:
        delta = weight_delta(target)
        if delta is None:
            continue
        view = weight if target.rows is None else weight[target.rows[0]:target.rows[1]]
        if delta.shape != view.shape:
            raise ValueError(f"{target.label}: delta {list(delta.shape)} does not fit weight {list(view.shape)}")
        if target.dora is not None:
            mag = target.dora.magnitude
            view.copy_(dora_merged(view, target.scale * delta, mag, strength, target.dora.on_out))
        else:
            view.add_(delta, alpha=strength * target.scale)
    return weight


def merge_bias(bias: torch.Tensor, targets: list[tuple[Target, float]]) -> torch.Tensor:
    """`bias` (fp32, in place) plus strength * diff_b of each target (bias diffs carry no alpha scale)."""
    for target, strength in targets:
        diff_b = bias_delta(target)
        if diff_b is None:
            continue
        view = bias if target.rows is None else bias[target.rows[0]:target.rows[1]]
        if diff_b.shape != view.shape:
            raise ValueError(f"{target.label}: bias diff {list(diff_b.shape)} does not fit bias {list(view.shape)}")
        view.add_(diff_b, alpha=strength)
    return bias
