"""Applying an adapter: merged into the weights, as dynamic slots in wrapped layers, or, when a
same-shaped adapter of that name is attached, as a hot swap of the values in its slots."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..adapter import Adapter
from ..blocks import Blocks
from ..errors import IncompatibleWeightsError
from ..loading import load_adapter
from ..sources import LoRAConfiguration
from . import blockwise, checkpoint
from .access import _locked, _model_of, _pipeline
from .layer import Slot, prepare, weight_rows
from .report import ApplyReport
from .state import EngineState, Record, Strength
from .transaction import Transaction, change
from .validate import Planned, check_compute_dtype, check_dynamic, check_mode, check_name, plan, slot_dtype

#: Above this requantization loss a merged adapter warns and suggests dynamic mode.
REQUANT_WARN = 0.1


def apply_adapter(
    model: nn.Module,
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
    `pipe.transformer` and its text-encoder part on `pipe.text_encoder`. `scale` may be per block:
    a {pattern: number} mapping (see `zimage_lora.blocks`; the text encoder takes its '*' value).
    """
    if (p := _pipeline(model)) is not None:
        return p.apply(model, source, scale=scale, mode=mode, name=name, filename=filename, strict=strict,
                       compute_dtype=compute_dtype)
    model = _model_of(model)
    mode = check_mode(mode)
    strength = blockwise.check_strength(scale)
    compute_dtype = check_compute_dtype(compute_dtype)
    if isinstance(source, LoRAConfiguration):
        strength = blockwise.scaled(strength, source.scale)
        name = name if name is not None else source.name
    explicit = name is not None
    if explicit:
        check_name(name)
    if isinstance(source, Adapter):
        adapter = source
        if strict and adapter.unmatched:
            listing = "; ".join(f"{u.key}: {u.reason}" for u in adapter.unmatched[:10])
            raise IncompatibleWeightsError(f"{adapter.source}: strict mode and unmatched keys: {listing}")
    else:
        adapter = load_adapter(source, model, name=name, filename=filename, strict=strict)
    name = name if explicit else check_name(adapter.name)
    strength = blockwise.resolve_for(model, adapter, strength)
    # The loader scanned what it read for NaN/Inf; an Adapter object is scanned here, before any change.
    report = apply_resolved(model, adapter, name=name, mode=mode, strength=strength, compute_dtype=compute_dtype,
                            explicit=explicit, scanned=not isinstance(source, Adapter))
    warn_requant(report)
    return report


def apply_resolved(
    model: nn.Module, adapter: Adapter, *, name: str, mode: str, strength: float | Blocks,
    compute_dtype: torch.dtype | None, explicit: bool = True, scanned: bool = False,
) -> ApplyReport:
    """`apply_adapter` past its argument checks, for an adapter resolved against `model`. `scanned`:
    its tensors came from the loader, which checked them for NaN/Inf already."""
    planned = plan(model, adapter, mode, scan=not scanned)
    with _locked(model, create=True) as state, change(model, state) as txn:
        return attach(txn, adapter, planned, name, mode, strength, compute_dtype, explicit)


def warn_requant(report: ApplyReport, stacklevel: int = 3) -> None:
    for module, loss in report.requant_loss.items():
        if loss > REQUANT_WARN:
            warnings.warn(
                f"merging adapter '{report.name}' into quantized layer '{module}' lost {loss:.0%} of its delta to "
                "requantization; apply it with mode='dynamic' to keep it exact.",
                stacklevel=stacklevel,
            )


def _free_name(state: EngineState, derived: str, source: str) -> str:
    """`derived`, or the first of `derived_2`, `derived_3`, ... that is free or holds the same source."""
    candidate, i = derived, 1
    while candidate in state.records and state.records[candidate].adapter.source != source:
        i += 1
        candidate = f"{derived}_{i}"
    return candidate


def attach(
    txn: Transaction,
    adapter: Adapter,
    planned: list[Planned],
    name: str,
    mode: str,
    strength: float | Blocks,
    compute_dtype: torch.dtype | None,
    explicit: bool = True,
    active: bool = True,
) -> ApplyReport:
    """Attach `adapter` as `name` within `txn` (which undoes it all if anything here raises)."""
    model, state = txn.model, txn.state
    notes = list(adapter.notes)
    renamed_from = None
    if not explicit:
        free = _free_name(state, name, adapter.source)
        if free != name:
            other = state.records[name].adapter.source or "an Adapter object"
            notes.append(
                f"the name '{name}' is taken by the adapter from {other}; this one is attached as '{free}' "
                f"(pass name='{name}' to replace that one instead)."
            )
            renamed_from, name = name, free
    dynamic = [p for p in planned if mode == "dynamic" and not p.is_patch]
    patches = [p.target for p in planned if mode == "merged" or p.is_patch]
    prepared = [(p, *prepare(p.target, p.module, p.backend, p.out_features)) for p in dynamic]
    headroom = math.inf
    for p, kind, tensors in prepared:  # merged mode's overflow rule, before anything changes
        where = f"adapter '{name}', module '{p.target.label}'"
        dtype = slot_dtype(p.module, compute_dtype)
        rows = weight_rows(p.module, p.backend, p.target.placement(p.out_features))
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
        applied=[p.target.label for p in planned],
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
        txn.attach(record, p, kind, tensors, p.target.placement(p.out_features))
    txn.publish_all()
    for module_name, loss in txn.rebuild(touched_patch).items():
        report.requant_loss[module_name] = loss
    return report


def _same_slots(model: nn.Module, old: Record, prepared: list[tuple[Planned, str, dict]]) -> list[Slot] | None:
    """The slots of `old` that a same-shaped adapter can be hot-swapped into (in `prepared`'s order),
    or None when it cannot: then the adapter is attached afresh."""
    if old.mode != "dynamic" or not old.active:
        return None
    by_place: dict[tuple[str, int, int], Slot] = {}
    for module_name, keys in old.wrapped.items():
        wrapper = model.get_submodule(module_name)
        for k in keys:
            slot = wrapper.slots[k]
            by_place[(module_name, slot.lo, slot.hi)] = slot
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


def _rows(p: Planned) -> tuple[int, int]:
    return p.target.placement(p.out_features).rows
