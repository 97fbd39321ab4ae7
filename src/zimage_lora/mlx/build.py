"""Each touched layer is a pure function of its kept arrays and the attached adapters: merged deltas
added in fp32 (the algorithms' row math, `apply.rows`) and rounded or requantized once, dynamic slots
on a wrapper. Every change computes all new layers first (`compute_changes`), then swaps them in (`commit`), so a
failure leaves the model as it was; restore is putting the kept arrays back, never a subtraction."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import mlx.core as mx
import torch

from .. import algorithms
from ..adapter import Target
from ..apply.rows import MergeFactors, add_rows
from ..errors import IncompatibleWeightsError
from ..placement import Placement
from . import quant
from .layer import Slot, set_slots, slot_tensors, wrap
from .state import Layer, Record, State
from .tree import set_path, to_mx, to_torch


@dataclass
class Change:
    layer: Layer
    key: tuple[Any, ...]
    merged: dict[str, mx.array] | None
    loss: float | None
    slots: tuple[Slot, ...]
    refreshed: dict[str, list[Slot]]


def make_slots(layer: Layer, record: Record, weight: torch.Tensor | None = None) -> list[Slot]:
    """`record`'s targets on `layer` prepared for the MLX forward (`weight`: fp32 weight to prepare
    weight-dependent algorithms from; default the layer's current one)."""
    out = []
    dtype = record.compute_dtype or layer.compute_dtype()
    for t in record.adapter.targets:
        if t.module != layer.name or layer.is_norm:
            continue
        placement = t.placement(layer.out_features)
        rows = layer.rows(placement) if weight is None else partial(_rows_of, weight, placement)
        strength = record.strength.at(layer.name)
        where = f"adapter '{record.name}', module '{t.label}'"
        kind, tensors, room = slot_tensors(t, placement, rows, dtype, strength.value, where)
        out.append(Slot(t, kind, tensors, placement, strength, room))
    return out


def _rows_of(weight: torch.Tensor, placement: Placement) -> torch.Tensor:
    return weight[placement.lo : placement.hi]


def _depends_on_weight(slot: Slot) -> bool:
    return slot.target.dora is not None or algorithms.get(slot.target.algorithm).needs_weight


def _finite(name: str, a: mx.array) -> None:
    if not bool(mx.all(mx.isfinite(a)).item()):
        raise IncompatibleWeightsError(
            f"merging into MLX layer '{name}' gives non-finite values (the delta times the scale overflows "
            f"the weight's dtype {a.dtype}). Lower the scale or use mode='dynamic'.")


def merged_arrays(layer: Layer, contribs: list[tuple[Record, Target]]) -> tuple[dict[str, mx.array] | None,
                                                                                 float | None]:
    """The layer's arrays with `contribs` merged (None: none), and the requantization loss."""
    if not contribs:
        return None, None
    kept = layer.kept
    prepared = [(MergeFactors(t, layer.out_features), r.strength.number(layer.name)) for r, t in contribs]
    new = dict(kept)
    if layer.is_norm:
        w = to_torch(kept["weight"])
        for p, s in prepared:
            w.add_(p.parts["diff"].reshape(-1), alpha=p.target.scale * s)
        new["weight"] = to_mx(w, kept["weight"].dtype)
        _finite(layer.name, new["weight"])
        return new, None
    loss = None
    weighted = [(p, s) for p, s in prepared if p.has_weight_delta]
    if weighted:
        spec = quant.Spec.of(layer.original) if layer.quantized else None
        w0 = to_torch(quant.decode(kept, spec)) if spec is not None else to_torch(kept["weight"])
        w = w0.clone()
        add_rows(w, 0, weighted)
        if spec is not None:
            stored: dict[str, mx.array] = {k: kept[k] for k in ("weight", "scales", "biases") if k in kept}
            arrays, decoded = quant.requantize(stored, spec, w)
            new.update(arrays)
            moved = float((w - w0).norm())
            loss = float((decoded - w).norm()) / moved if moved > 0 else 0.0
            _finite(layer.name, mx.array(decoded.numpy()))
        else:
            new["weight"] = to_mx(w, kept["weight"].dtype)
            _finite(layer.name, new["weight"])
    bias_parts = [(p.bias_delta(), s) for p, s in prepared]
    if any(b is not None for b, _ in bias_parts):
        b = to_torch(kept["bias"])
        for placed, s in bias_parts:
            if placed is not None:
                lo, hi, db = placed
                b[lo:hi].add_(db, alpha=s)
        new["bias"] = to_mx(b, kept["bias"].dtype)
        _finite(layer.name + ".bias", new["bias"])
    return new, loss


def compute_changes(state: State, names: list[str]) -> list[Change]:
    """The new contents of each named layer under the attached adapters; changes nothing."""
    changes = []
    merged_on = state.contributions()
    dynamic = [r for r in state.records.values() if r.active and r.mode == "dynamic"]
    for name in dict.fromkeys(names):
        layer = state.layers[name]
        contribs = merged_on.get(name, [])
        key = tuple((r.name, id(t), r.strength.number(name)) for r, t in contribs)
        merged, loss = (layer.merged, layer.loss) if key == layer.merged_key else merged_arrays(layer, contribs)
        refreshed: dict[str, list[Slot]] = {}
        if key != layer.merged_key:  # DoRA and weight-reading algorithms see the weight under them
            weight = None
            for rec_name, slots in layer.slots.items():
                if any(_depends_on_weight(s) for s in slots):
                    if weight is None:
                        weight = _decoded(layer, merged)
                    refreshed[rec_name] = make_slots(layer, state.records[rec_name], weight)
        active: list[Slot] = []
        for r in dynamic:
            active += refreshed.get(r.name, layer.slots.get(r.name, []))
        changes.append(Change(layer, key, merged, loss, tuple(active), refreshed))
    return changes


def _decoded(layer: Layer, merged: dict[str, mx.array] | None) -> torch.Tensor:
    a = merged if merged is not None else layer.kept
    if layer.quantized:
        return to_torch(quant.decode(a, quant.Spec.of(layer.original)))
    return to_torch(a["weight"])


def commit(state: State, changes: list[Change]) -> dict[str, float]:
    """Swap the computed contents in (nothing here can fail on valid arrays). Returns the losses."""
    losses = {}
    state.version += 1
    for c in changes:
        layer = c.layer
        layer.merged_key, layer.merged, layer.loss = c.key, c.merged, c.loss
        layer.slots.update(c.refreshed)
        for k, v in layer.arrays().items():
            layer.original[k] = v
        if c.slots:
            if layer.wrapper is None:
                layer.wrapper = wrap(layer.original, c.slots)
            else:  # same object (a compiled graph may hold it): new arrays and slots
                for k, v in layer.arrays().items():
                    layer.wrapper[k] = v
                set_slots(layer.wrapper, c.slots)
            set_path(state.model, layer.path, layer.wrapper)
        else:
            layer.wrapper = None
            set_path(state.model, layer.path, layer.original)
        if c.loss is not None and c.merged is not None:
            losses[layer.name] = c.loss
        if c.merged is None and not any(layer.slots.values()):
            del state.layers[layer.name]  # untouched again: the original object with its own arrays
    return losses
