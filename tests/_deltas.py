"""Test helper: the per-module deltas a resolved adapter describes."""

from __future__ import annotations

import torch

from zimage_lora import algorithms


def resolved_deltas(adapter, model) -> dict[str, torch.Tensor]:
    """Per module: the sum of its targets' scaled deltas, placed on their rows."""
    weights = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for t in adapter.targets:
        w = weights[t.module + ".weight"]
        d = algorithms.delta(t.algorithm, t.tensors) * t.scale
        if t.delta_rows is not None:
            d = d[t.delta_rows[0]:t.delta_rows[1]]
        full = out.setdefault(t.module, torch.zeros(w.shape))
        if t.rows is None:
            full += d
        else:
            full[t.rows[0]:t.rows[1]] += d
    return out
