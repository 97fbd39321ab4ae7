"""Applying an adapter: merged into the weights, as dynamic slots in wrapped layers, or, when a
same-shaped adapter of that name is attached, as a hot swap of the values in its slots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..adapter import Adapter, Unmatched
from ..blocks import Blocks
from ..errors import IncompatibleWeightsError
from ..mlx import dispatcher
from ..sources import LoRAConfiguration
from . import blockwise, checkpoint
from .access import Scope
from .components import TRANSFORMER, Component, components_of, is_pipeline, load_parts, pipeline_report
from .layer import AdapterLinear
from .report import ApplyReport, free_name, warn_requant
from .slot import Slot, slot_tensors, weight_rows
from .state import Record, Strength
from .transaction import Transaction
from .validate import (
    Checked,
    check_compute_dtype,
    check_dynamic,
    check_mode,
    check_name,
    check_targets,
    slot_dtype,
)


def apply_adapter(
    model: Any,
    source: str | Path | LoRAConfiguration | Adapter,
    *,
    scale: float | Mapping[str, float] = 1.0,
    mode: str = "dynamic",
    name: str | None = None,
    filename: str | None = None,
    strict: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> ApplyReport:
    """Attach an adapter to `model`, merged into the weights or as dynamic wrapped layers.

    `source`: a `.safetensors` path, a folder, a hub id, a `LoRAConfiguration` (its scale multiplies
    `scale`) or an `Adapter` from `load_adapter`. `name`: an explicit name replaces the adapter of that
    name if one is attached (in place, without touching compiled graphs, when the shapes match; the
    report says `replaced`). Without one the name comes from the source (the file stem); when that is
    taken by an adapter from another source, a free `stem_2`, `stem_3`, ... is used instead and the
    report says so (`renamed_from`). `compute_dtype`: dynamic mode's compute dtype (default: the
    input's; `torch.float32` for extra precision on bf16 models). On any error the model is left
    exactly as it was. A pipeline with a text encoder gets the file's transformer part on
    `pipe.transformer` and its text-encoder part on `pipe.text_encoder` (an `Adapter` object, resolved
    against one model, goes to the transformer), in one change: both or neither. `scale` may be per
    block: a {pattern: number} mapping (see `zimage_lora.blocks`; the text encoder takes its '*' value).
    """
    if (mlx := dispatcher(model)) is not None:  # an MLX model: the MLX engine (zimage_lora.mlx)
        report: ApplyReport = mlx.apply(model, source, scale=scale, mode=mode, name=name, filename=filename,
                                        strict=strict, compute_dtype=compute_dtype)
        return report
    parts = components_of(model)
    mode = check_mode(mode)
    strength = blockwise.check_strength(scale)
    compute_dtype = check_compute_dtype(compute_dtype)
    if isinstance(source, LoRAConfiguration):
        strength = blockwise.scaled(strength, source.scale)
        name = name if name is not None else source.name
    explicit = name is not None
    if explicit:
        check_name(name)
    left: list[Unmatched] = []
    if isinstance(source, Adapter):
        adapters = {TRANSFORMER: source}
        if strict and source.unmatched:
            listing = "; ".join(f"{u.key}: {u.reason}" for u in source.unmatched[:10])
            raise IncompatibleWeightsError(f"{source.source}: strict mode and unmatched keys: {listing}")
    else:
        adapters, left = load_parts(parts, source, name=name, filename=filename, strict=strict)
    name = name if explicit else check_name(next(iter(adapters.values())).name)
    assert name is not None  # given (explicit) or the source's
    # The loader scanned what it read for NaN/Inf; an Adapter object is scanned here, before any change.
    reports = apply_parts(parts, adapters, name=name, mode=mode, strength=strength, compute_dtype=compute_dtype,
                          explicit=explicit, scanned=not isinstance(source, Adapter))
    for report in reports.values():
        warn_requant(report)
    return pipeline_report(reports, left) if is_pipeline(parts) else reports[TRANSFORMER]


def apply_resolved(
    model: Any, adapter: Adapter, *, name: str, mode: str, strength: float | Mapping[str, float] | Blocks,
    compute_dtype: torch.dtype | None, explicit: bool = True, scanned: bool = False, active: bool = True,
) -> ApplyReport:
    """`apply_adapter` past its argument checks, for an adapter resolved against `model`'s transformer.
    `active=False`: attached inactive, in the same change (never published active)."""
    parts = components_of(model)[:1]
    return apply_parts(parts, {TRANSFORMER: adapter}, name=name, mode=mode, strength=strength,
                       compute_dtype=compute_dtype, explicit=explicit, scanned=scanned, active=active)[TRANSFORMER]


def apply_parts(
    parts: list[Component], adapters: dict[str, Adapter], *, name: str, mode: str,
    strength: float | Mapping[str, float] | Blocks,
    compute_dtype: torch.dtype | None, explicit: bool, scanned: bool, active: bool = True,
) -> dict[str, ApplyReport]:
    """Attach each component's adapter (`adapters`, by part) as `name` in one scope: all or none.
    `scanned`: the tensors came from the loader, which checked them for NaN/Inf already. A component
    holding `name` that gets no part of this adapter loses its older one: the name now means this one."""
    # Every part is validated before any component changes.
    strengths = {
        c.part: blockwise.for_part(c.module, adapters[c.part], strength, c.part == TRANSFORMER)
        for c in parts if c.part in adapters
    }
    checked = {
        c.part: check_targets(c.module, adapters[c.part], mode, scan=not scanned) for c in parts if c.part in adapters
    }

    def change(scope: Scope) -> dict[str, ApplyReport]:
        reports: dict[str, ApplyReport] = {}
        renamed_from, final = None, name
        if not explicit:
            final = free_name(name, next(iter(adapters.values())).source,
                              lambda n: [r.adapter.source for _, r in scope.holding(n)])
            renamed_from = name if final != name else None
        for c, txn in scope.entries:
            if c.part in adapters:
                assert txn is not None  # a component with a part of the adapter has a transaction
                reports[c.part] = attach(txn, adapters[c.part], checked[c.part], final, mode, strengths[c.part],
                                         compute_dtype,
                                         active=active, renamed_from=renamed_from,
                                         taken_by=_holder(scope, renamed_from))
            elif txn is not None and final in txn.state.records:
                txn.remove([txn.state.records[final]])
        return reports

    return Scope(parts, create=set(adapters)).run(change)


def _holder(scope: Scope, name: str | None) -> str:
    """What holds `name` in the report's words: its source, or 'an Adapter object'."""
    held = scope.holding(name) if name is not None else []
    return (held[0][1].adapter.source if held else "") or "an Adapter object"


def attach(
    txn: Transaction,
    adapter: Adapter,
    checked: list[Checked],
    name: str,
    mode: str,
    strength: float | Blocks,
    compute_dtype: torch.dtype | None,
    active: bool = True,
    renamed_from: str | None = None,
    taken_by: str = "",
) -> ApplyReport:
    """Attach `adapter` as `name` within `txn` (which undoes it all if anything here raises).
    `renamed_from`: the name derived from the source, taken by the adapter from `taken_by`."""
    model, state = txn.model, txn.state
    notes = list(adapter.notes)
    if renamed_from is not None:
        notes.append(
            f"the name '{renamed_from}' is taken by the adapter from {taken_by}; this one is attached as '{name}' "
            f"(pass name='{renamed_from}' to replace that one instead)."
        )
    dynamic = [p for p in checked if mode == "dynamic" and not p.is_patch]
    patches = [p.target for p in checked if mode == "merged" or p.is_patch]
    prepared = [(p, *slot_tensors(p.target, p.module, p.backend, p.placement)) for p in dynamic]
    headroom = math.inf
    for p, kind, tensors in prepared:  # merged mode's overflow rule, before anything changes
        where = f"adapter '{name}', module '{p.target.label}'"
        dtype = slot_dtype(p.module, compute_dtype)
        rows = weight_rows(p.module, p.backend, p.placement)
        at = strength.at(p.target.module) if isinstance(strength, Blocks) else strength
        headroom = min(headroom, check_dynamic(where, kind, tensors, at, dtype, rows))
    old = state.records.get(name)
    if old is not None:
        notes.append(f"replaced the attached adapter '{name}' (from {old.adapter.source or 'an Adapter object'}).")
    report = ApplyReport(
        name=name,
        mode=mode,
        scale=strength.default if isinstance(strength, Blocks) else strength,
        source=adapter.source,
        format=adapter.format,
        applied=[p.target.label for p in checked],
        unmatched=list(adapter.unmatched),
        notes=notes,
        replaced=old is not None,
        renamed_from=renamed_from,
    )
    if old is not None and active and not patches and not old.patches:
        slots = _same_slots(model, old, prepared)
        if slots is not None:
            for slot, (p, _kind, tensors) in zip(slots, prepared, strict=True):
                txn.swap(slot, p.target, old.name, tensors)
            old.adapter = adapter
            blockwise.set_strength(model, old, strength)
            old.headroom = headroom
            report.hotswapped = True
            return report

    record = Record(name, mode, adapter, Strength(strength), compute_dtype, patches=patches, active=active)
    record.headroom = headroom
    if mode == "dynamic" and patches:
        checkpoint.install(model)  # its norm-layer patches stay out of state_dict (see apply.checkpoint)
    touched_patch = list(dict.fromkeys([t.module for t in patches] + ([t.module for t in old.patches] if old else [])))
    if old is not None:
        txn.detach(old)
    txn.put(record)
    for p, kind, tensors in prepared:
        txn.attach(record, p, kind, tensors)
    txn.publish_all()
    for module_name, loss in txn.rebuild(touched_patch).items():
        report.requant_loss[module_name] = loss
    return report


def _same_slots(
    model: nn.Module, old: Record, prepared: list[tuple[Checked, str, dict[str, torch.Tensor]]]
) -> list[Slot] | None:
    """The slots of `old` that a same-shaped adapter can be hot-swapped into (in `prepared`'s order),
    or None when it cannot: then the adapter is attached afresh."""
    if old.mode != "dynamic" or not old.active:
        return None
    by_place: dict[tuple[str, int, int], Slot] = {}
    for module_name, keys in old.wrapped.items():
        wrapper = cast(AdapterLinear, model.get_submodule(module_name))
        for k in keys:
            held = wrapper.slots[k]
            by_place[(module_name, held.lo, held.hi)] = held
    if len(by_place) != len(prepared):
        return None
    slots: list[Slot] = []
    for p, kind, tensors in prepared:
        slot = by_place.get((p.target.module, *_rows(p)))
        if slot is None or slot.kind != kind:  # "fm1" (DoRA) and the rest: the name check below
            return None
        if set(slot.names) != set(tensors) or slot.shapes() != {k: tuple(v.shape) for k, v in tensors.items()}:
            return None
        slots.append(slot)
    if len(set(map(id, slots))) != len(slots):
        return None
    return slots


def _rows(p: Checked) -> tuple[int, int]:
    return p.placement.rows
