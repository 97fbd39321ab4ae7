"""apply / remove / re-weight / switch / list: the engine's public functions.

Each works on the components of what it is given (`apply.components`: a bare model is one, a pipeline
with a text encoder two) and follows one pattern: check the arguments, then inside one `Scope`
(`apply.access`: each component's write lock and transaction) check everything against the attached
adapters and mutate; if anything raises, every component's transaction undoes exactly what it did, so
concurrent forward passes see the adapters before or after the change and a failed change leaves every
component as it was. Applying lives in `apply.attach`, the fast-switching tables in `apply.switching`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import nn

from ..backends import backend_for
from ..blocks import Blocks
from ..mlx import dispatcher
from . import blockwise
from .access import Scope, _model_of, attached, iter_records
from .attach import apply_adapter, apply_resolved, attach
from .components import TRANSFORMER, components_of, is_pipeline, pipeline_infos
from .layer import AdapterLinear
from .report import REQUANT_WARN, AdapterInfo, ApplyReport, warn_requant
from .retune import retune
from .slot import weight_rows
from .state import Record
from .transaction import Transaction
from .validate import (
    MODES,
    check_dynamic,
    check_mode,
    check_name,
    check_names,
    check_targets,
    check_weights,
)

__all__ = [
    "MODES", "REQUANT_WARN", "apply_adapter", "apply_resolved", "attached", "list_adapters", "remove_adapter",
    "remove_adapters", "set_active_adapters", "set_adapter_scale", "switch_mode", "_model_of",
]


def remove_adapter(model: Any, name: str | None = None) -> list[str]:
    """Remove one adapter (or all, `name=None`). Returns the names removed.

    Merged weights are restored from the kept originals, never by subtracting; with every adapter gone
    the model's parameters, buffers and module tree are bit-identical to before the first apply.
    """
    if (mlx := dispatcher(model)) is not None:  # an MLX model: the MLX engine (zimage_lora.mlx)
        removed: list[str] = mlx.remove(model, name)
        return removed
    return remove_adapters(model, None if name is None else [check_name(name)])


def remove_adapters(model: Any, names: list[str] | None) -> list[str]:
    """Remove `names` (None: all) from every component holding them, all or none."""
    if (mlx := dispatcher(model)) is not None:
        return mlx.remove(model) if names is None else [n for name in names for n in mlx.remove(model, name)]
    def change(scope: Scope) -> list[str]:
        removed = scope.names() if names is None else names
        unknown = [n for n in removed if not scope.holding(n)]
        if unknown:
            raise scope.not_attached(unknown)
        for txn in scope.txns():
            txn.remove([txn.state.records[n] for n in removed if n in txn.state.records])
        return removed

    return Scope(components_of(model)).run(change)


def set_adapter_scale(model: Any, name: str, scale: float | Mapping[str, float]) -> None:
    """Re-weight an attached adapter. Dynamic: one shared value, O(1). Merged: exact re-merge from the kept
    original of every module whose strength changed. A scale whose delta overflows is refused in both
    modes. `scale` may be per block, a {pattern: number} mapping (see `zimage_lora.blocks`)."""
    if not isinstance(model, nn.Module) and (mlx := dispatcher(model)) is not None:
        mlx.set_scale(model, name, scale)
        return
    parts = components_of(model)
    check_name(name)
    asked = blockwise.check_strength(scale)
    if type(asked) is float and retune(parts, {name: asked}):
        return None  # only strengths changed (the hot path); anything else is a full change below

    def change(scope: Scope) -> None:
        held = scope.holding(name)
        if not held:
            raise scope.not_attached([name])
        values = [_resolved(scope, txn, record, asked) for txn, record in held]
        for (txn, record), value in zip(held, values, strict=True):  # every component's check before any changes
            _check_strength(txn.model, record, value)
        for (txn, record), value in zip(held, values, strict=True):
            before = record.strength.get()
            blockwise.set_strength(txn.model, record, value)  # dynamic: the shared value (and per-module ones)
            if record.patches and record.active:
                txn.rebuild(blockwise.changed(record.patches, before, value))

    Scope(parts).run(change)


def _resolved(scope: Scope, txn: Transaction, record: Record, asked: Any) -> blockwise.Strengthish:
    """A caller's strength for one component's record (`blockwise.for_part`)."""
    part = next(c.part for c, t in scope.entries if t is txn)
    return blockwise.for_part(txn.model, record.adapter, asked, part == TRANSFORMER)


def _check_strength(model: nn.Module, record: Record, value: blockwise.Strengthish) -> None:
    """Dynamic mode's overflow rule for a new strength: free within the headroom found at apply time."""
    if not record.wrapped or blockwise.largest(value) <= record.headroom:
        return
    for module_name, keys in record.wrapped.items():
        wrapper = cast(AdapterLinear, model.get_submodule(module_name))
        for k in keys:
            slot = wrapper.slots[k]
            tensors = {n: getattr(slot, n) for n in slot.names}
            dtype = next(iter(tensors.values())).dtype
            base = wrapper.base_layer
            at = value.at(module_name) if isinstance(value, Blocks) else value
            check_dynamic(f"adapter '{record.name}', module '{slot.target.label}'", slot.kind, tensors, at, dtype,
                          weight_rows(base, backend_for(base), slot.placement))


def set_active_adapters(
    model: Any, names: str | Sequence[str] | None, weights: Sequence[float | Mapping[str, float]] | None = None
) -> None:
    """Make exactly `names` active (None: all), optionally with new scales (one per name); the others stay
    attached but off.

    Dynamic adapters switch by replacing each touched layer's active tuple (no tensor work); merged ones
    are re-merged from the kept originals.
    """
    if not isinstance(model, nn.Module) and (mlx := dispatcher(model)) is not None:
        mlx.set_active(model, names, weights)
        return
    parts = components_of(model)
    asked = None if names is None else check_names(names)
    if asked is not None:
        values = check_weights(weights, asked)
        floats = {} if values is None else dict(zip(asked, values, strict=True))
        if set(map(type, floats.values())) <= {float} and retune(parts, floats, asked):
            return None  # only strengths and active flags changed (the hot path)

    def change(scope: Scope) -> None:
        attached_now = scope.names()
        wanted = attached_now if asked is None else asked
        values = check_weights(weights, wanted)
        unknown = [n for n in wanted if n not in attached_now]
        if unknown:
            raise scope.not_attached(unknown)
        # (txn, name) -> that component's strength for `name`, each checked before any changes
        resolved: dict[tuple[int, str], blockwise.Strengthish] = {}
        if values is not None:
            for name, value in zip(wanted, values, strict=True):
                for txn, record in scope.holding(name):
                    resolved[id(txn), name] = here = _resolved(scope, txn, record, value)
                    _check_strength(txn.model, record, here)
        for txn in scope.txns():
            touched_merged: list[str] = []
            for name, record in txn.state.records.items():
                was_active, before = record.active, record.strength.get()
                record.active = name in wanted
                if values is not None and record.active:
                    blockwise.set_strength(txn.model, record, resolved[id(txn), name])
                if record.patches and record.active != was_active:
                    touched_merged.extend(t.module for t in record.patches)
                elif record.patches and record.active:  # only the modules whose strength changed
                    touched_merged.extend(blockwise.changed(record.patches, before, record.strength.get()))
            txn.publish_fast()
            txn.rebuild(list(dict.fromkeys(touched_merged)))

    Scope(parts).run(change)


def switch_mode(model: Any, names: str | Sequence[str] | None, mode: str) -> None:
    """Run `names` (None: all) in `mode` ("merged": fuse, "dynamic": unfuse), at the scale, compute dtype
    and active state each has: a disabled adapter stays disabled (fused, it changes no weight until it
    is enabled). All or nothing: if one fails, those already switched go back."""
    if (mlx := dispatcher(model)) is not None:
        mlx.switch_mode(model, names, mode)
        return
    parts = components_of(model)
    mode = check_mode(mode)
    asked = None if names is None else check_names(names)

    def change(scope: Scope) -> list[ApplyReport]:
        attached_now = scope.names()
        wanted = attached_now if asked is None else asked
        unknown = [n for n in wanted if n not in attached_now]
        if unknown:
            raise scope.not_attached(unknown)
        return [_reattach(txn, record, mode) for name in wanted for txn, record in scope.holding(name)
                if record.mode != mode]

    for report in Scope(parts).run(change):
        warn_requant(report, stacklevel=4)  # the caller of Adapters.fuse / unfuse


def _reattach(txn: Transaction, record: Record, mode: str) -> ApplyReport:
    """`record`'s adapter attached again in `mode`, with its scale, compute dtype and active state."""
    checked = check_targets(txn.model, record.adapter, mode, scan=False)  # its tensors were scanned at apply
    return attach(txn, record.adapter, checked, record.name, mode, record.strength.get(), record.compute_dtype,
                  active=record.active)


def list_adapters(model: Any) -> list[AdapterInfo]:
    """The attached adapters in the order they were applied: name, mode, scale, source, format, size.
    Over a pipeline, one entry per name naming the components it is on."""
    if (mlx := dispatcher(model)) is not None:
        infos: list[AdapterInfo] = mlx.list_all(model)
        return infos
    parts = components_of(model)
    listed = [
        (c.part, AdapterInfo(
            name=r.name,
            mode=r.mode,
            scale=r.strength.value,
            active=r.active,
            source=r.adapter.source,
            format=r.adapter.format,
            modules=len(r.adapter.modules),
            algorithms=tuple(r.adapter.algorithms),
        ))
        for c, r in iter_records(parts)  # one atomic copy per component: a concurrent change never shows half-done
    ]
    return pipeline_infos(listed) if is_pipeline(parts) else [info for _, info in listed]
