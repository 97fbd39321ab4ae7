"""apply / remove / re-weight / switch / list: the engine's public functions.

Every change follows the same pattern: validate everything, then mutate inside one transaction
(`apply.transaction`) that undoes exactly what it did if anything raises, all under the model's
write lock so that concurrent forward passes see the adapters before or after the change. Applying
lives in `apply.attach`, the fast-switching tables in `apply.switching`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..backends import backend_for
from ..blocks import Blocks
from . import blockwise
from .access import _locked, _model_of, _not_attached, _pipeline, attached
from .attach import REQUANT_WARN, apply_adapter, apply_resolved, attach, warn_requant
from .layer import weight_rows
from .report import AdapterInfo, ApplyReport
from .state import Record, get_state
from .transaction import Transaction, change
from .validate import (
    MODES,
    check_dynamic,
    check_mode,
    check_name,
    check_names,
    check_weights,
    plan,
)

__all__ = [
    "MODES", "REQUANT_WARN", "apply_adapter", "apply_resolved", "attached", "list_adapters", "remove_adapter",
    "set_active_adapters", "set_adapter_scale", "switch_mode", "_model_of",
]


def remove_adapter(model: nn.Module, name: str | None = None) -> list[str]:
    """Remove one adapter (or all, `name=None`). Returns the names removed.

    Merged weights are restored from the kept originals, never by subtracting; with every adapter gone
    the model's parameters, buffers and module tree are bit-identical to before the first apply.
    """
    if (p := _pipeline(model)) is not None:
        return p.remove(model, name)
    model = _model_of(model)
    if name is not None:
        check_name(name)
    with _locked(model) as state:
        if state is None:
            if name is None:
                return []
            raise _not_attached([name], None)
        if name is not None and name not in state.records:
            raise _not_attached([name], state)
        names = [name] if name is not None else list(state.records)
        records = [state.records[n] for n in names]
        with change(model, state) as txn:
            for r in records:
                txn.detach(r)
                txn.drop(r.name)
            txn.publish_all()
            txn.rebuild(list(dict.fromkeys(t.module for r in records for t in r.patches)))
    return names


def set_adapter_scale(model: nn.Module, name: str, scale: float | Mapping[str, float]) -> None:
    """Re-weight an attached adapter. Dynamic: one shared value, O(1). Merged: exact re-merge from the kept
    original of every module whose strength changed. A scale whose delta overflows is refused in both
    modes. `scale` may be per block, a {pattern: number} mapping (see `zimage_lora.blocks`)."""
    if (p := _pipeline(model)) is not None:
        return p.set_scale(model, name, scale)
    model = _model_of(model)
    check_name(name)
    asked = blockwise.check_strength(scale)
    with _locked(model) as state:
        if state is None or name not in state.records:
            raise _not_attached([name], state)
        record = state.records[name]
        value = blockwise.resolve_for(model, record.adapter, asked)
        _check_strength(model, record, value)
        before = record.strength.get()
        if not (record.patches and record.active):
            # dynamic (or off): one shared value (and per-module values), a change with nothing to undo
            blockwise.set_strength(model, record, value)
            return
        with change(model, state) as txn:
            blockwise.set_strength(model, record, value)
            txn.rebuild(blockwise.changed(record.patches, before, value))


def _check_strength(model: nn.Module, record: Record, value: blockwise.Strengthish) -> None:
    """Dynamic mode's overflow rule for a new strength: free within the headroom found at apply time."""
    if not record.wrapped or blockwise.largest(value) <= record.headroom:
        return
    for module_name, keys in record.wrapped.items():
        wrapper = model.get_submodule(module_name)
        for k in keys:
            slot = wrapper.slots[k]
            tensors = {n: getattr(slot, n) for n in slot.names}
            dtype = next(iter(tensors.values())).dtype
            base = wrapper.base_layer
            at = value.at(module_name) if isinstance(value, Blocks) else value
            check_dynamic(f"adapter '{record.name}', module '{slot.target.label}'", slot.kind, tensors, at, dtype,
                          weight_rows(base, backend_for(base), slot.placement))


def set_active_adapters(
    model: nn.Module, names: str | list[str] | None, weights: list[float | Mapping[str, float]] | None = None
) -> None:
    """Make exactly `names` active (None: all), optionally with new scales (one per name); the others stay
    attached but off.

    Dynamic adapters switch by replacing each touched layer's active tuple (no tensor work); merged ones
    are re-merged from the kept originals.
    """
    if (p := _pipeline(model)) is not None:
        return p.set_active(model, names, weights)
    model = _model_of(model)
    asked = None if names is None else check_names(names)
    with _locked(model) as state:
        attached_now = list(state.records) if state is not None else []
        wanted = attached_now if asked is None else asked
        values = check_weights(weights, wanted)
        unknown = [n for n in wanted if n not in attached_now]
        if unknown:
            raise _not_attached(unknown, state)
        if state is None:
            return
        if values is not None:
            records = [state.records[n] for n in wanted]
            values = [blockwise.resolve_for(model, r.adapter, v) for r, v in zip(records, values, strict=True)]
            for name, value in zip(wanted, values, strict=True):
                _check_strength(model, state.records[name], value)
        with change(model, state) as txn:
            touched_merged: list[str] = []
            for name, record in state.records.items():
                was_active, before = record.active, record.strength.get()
                record.active = name in wanted
                if values is not None and record.active:
                    blockwise.set_strength(model, record, values[wanted.index(name)])
                if record.patches and record.active != was_active:
                    touched_merged.extend(t.module for t in record.patches)
                elif record.patches and record.active:  # only the modules whose strength changed
                    touched_merged.extend(blockwise.changed(record.patches, before, record.strength.get()))
            txn.publish_fast()
            txn.rebuild(list(dict.fromkeys(touched_merged)))


def switch_mode(model: nn.Module, names: str | list[str] | None, mode: str) -> None:
    """Run `names` (None: all) in `mode` ("merged": fuse, "dynamic": unfuse), at the scale, compute dtype
    and active state each has: a disabled adapter stays disabled (fused, it changes no weight until it
    is enabled). All or nothing: if one fails, those already switched go back."""
    if (p := _pipeline(model)) is not None:
        return p.switch_mode(model, names, mode)
    model = _model_of(model)
    mode = check_mode(mode)
    asked = None if names is None else check_names(names)
    with _locked(model) as state:
        attached_now = list(state.records) if state is not None else []
        wanted = attached_now if asked is None else asked
        unknown = [n for n in wanted if n not in attached_now]
        if unknown:
            raise _not_attached(unknown, state)
        if state is None:
            return
        reports = []
        with change(model, state) as txn:
            for name in wanted:
                record = state.records[name]
                if record.mode != mode:
                    reports.append(_reattach(txn, record, mode))
    for report in reports:
        warn_requant(report, stacklevel=4)  # the caller of Adapters.fuse / unfuse


def _reattach(txn: Transaction, record: Record, mode: str) -> ApplyReport:
    """`record`'s adapter attached again in `mode`, with its scale, compute dtype and active state."""
    planned = plan(txn.model, record.adapter, mode, scan=False)  # its tensors were checked when it was applied
    return attach(txn, record.adapter, planned, record.name, mode, record.strength.get(), record.compute_dtype,
                  active=record.active)


def list_adapters(model: nn.Module) -> list[AdapterInfo]:
    """The attached adapters in the order they were applied: name, mode, scale, source, format, size."""
    if (p := _pipeline(model)) is not None:
        return p.list_all(model)
    model = _model_of(model)
    state = get_state(model)
    if state is None:
        return []
    records = list(state.records.values())  # one atomic copy: a concurrent change never shows half-done
    return [
        AdapterInfo(
            name=r.name,
            mode=r.mode,
            scale=r.strength.value,
            active=r.active,
            source=r.adapter.source,
            format=r.adapter.format,
            modules=len(r.adapter.modules),
            algorithms=tuple(r.adapter.algorithms),
        )
        for r in records
    ]
