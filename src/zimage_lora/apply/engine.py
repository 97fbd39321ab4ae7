"""apply / remove / re-weight / list: the engine's public functions.

Every change follows the same pattern: validate everything, then mutate inside one transaction that
undoes exactly what it did if anything raises, all under the model's write lock so that concurrent
forward passes see the adapters before or after the change.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter, Target
from ..backends import backend_for
from ..errors import IncompatibleWeightsError, LoRAError, _LegacyArgumentError
from ..loading import load_adapter
from ..sources import LoRAConfiguration
from . import checkpoint, merge
from .layer import AdapterLinear, Slot, prepare, refresh_dora
from .report import AdapterInfo, ApplyReport
from .state import EngineState, Record, Strength, drop_state, get_state
from .validate import (
    MODES,  # noqa: F401 - re-exported: the modes were defined here first
    Planned,
    base_of,
    check_compute_dtype,
    check_dynamic,
    check_mode,
    check_name,
    check_names,
    check_scale,
    check_weights,
    plan,
    slot_dtype,
)

#: Above this requantization loss a merged adapter warns and suggests dynamic mode.
REQUANT_WARN = 0.1


def _model_of(model: Any) -> nn.Module:
    """Accept a pipeline (anything with a `.transformer` module) as well as the transformer itself."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise _LegacyArgumentError(
        f"expected a torch.nn.Module (the Z-Image transformer) or a pipeline, got {type(model)}"
    )


def _pipeline(model: Any):
    """The pipeline dispatcher when `model` is a pipeline with a text encoder (see apply.pipeline)."""
    from . import pipeline

    return pipeline if pipeline.components(model) is not None else None


@contextmanager
def _locked(model: nn.Module, create: bool = False) -> Iterator[EngineState | None]:
    """The model's current state with its write lock held (None: nothing attached, and not `create`).

    Every public function looks its records up inside this, never before: a state that a concurrent
    remove dropped while we waited for its lock is not used; we look again (and find the new one).
    """
    while True:
        state = get_state(model, create=create)
        if state is None:
            yield None
            return
        with state.lock:
            if get_state(model) is state:
                yield state
                return


def _not_attached(names: list[str], state: EngineState | None) -> LoRAError:
    attached = list(state.records) if state is not None else []
    which = f"'{names[0]}'" if len(names) == 1 else str(names)
    return LoRAError(
        f"no adapter named {which} is attached; attached: {attached or 'none'}. list_adapters(model) shows them."
    )


# ---------------------------------------------------------------------------------------------------
def apply_adapter(
    model: nn.Module,
    source: str | Path | LoRAConfiguration | Adapter,
    *,
    scale: float = 1.0,
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
    `pipe.transformer` and its text-encoder part on `pipe.text_encoder`.
    """
    if (p := _pipeline(model)) is not None:
        return p.apply(model, source, scale=scale, mode=mode, name=name, filename=filename, strict=strict,
                       compute_dtype=compute_dtype)
    model = _model_of(model)
    mode = check_mode(mode)
    strength = check_scale(scale)
    compute_dtype = check_compute_dtype(compute_dtype)
    if isinstance(source, LoRAConfiguration):
        strength = check_scale(strength * source.scale)
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
        # The finite scan happens once, in validation before anything changes (see apply.validate).
        adapter = load_adapter(source, model, name=name, filename=filename, strict=strict, check_finite=False)
    name = name if explicit else check_name(adapter.name)
    planned = plan(model, adapter, mode)

    with _locked(model, create=True) as state:
        try:
            report = _apply_locked(model, state, adapter, planned, name, mode, strength, compute_dtype, explicit)
        finally:
            if not state.records:
                drop_state(model)  # under the lock, so no other change can be waiting on this state
    _warn_requant(report)
    return report


def _warn_requant(report: ApplyReport, stacklevel: int = 3) -> None:
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


def _apply_locked(
    model: nn.Module,
    state: EngineState,
    adapter: Adapter,
    planned: list[Planned],
    name: str,
    mode: str,
    strength: float,
    compute_dtype: torch.dtype | None,
    explicit: bool = True,
    active: bool = True,
) -> ApplyReport:
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
        headroom = min(headroom, check_dynamic(where, kind, tensors, strength, dtype))
    old = state.records.get(name)
    if old is not None:
        notes.append(f"replaced the attached adapter '{name}' (from {old.adapter.source or 'an Adapter object'}).")
    report = ApplyReport(
        name=name,
        mode=mode,
        scale=strength,
        source=adapter.source,
        format=adapter.format,
        applied=[p.target.label for p in planned],
        unmatched=list(adapter.unmatched),
        notes=notes,
        replaced=old is not None,
        renamed_from=renamed_from,
    )
    if (
        old is not None
        and active
        and not patches
        and not old.patches
        and _hotswap(model, old, prepared, adapter, strength)
    ):
        old.headroom = headroom
        report.hotswapped = True
        return report

    record = Record(name, mode, adapter, Strength(strength), compute_dtype, patches=patches, active=active)
    record.headroom = headroom
    if mode == "dynamic" and patches:
        checkpoint.install(model)  # its norm-layer patches stay out of state_dict (see apply.checkpoint)
    prior_records = dict(state.records)
    touched_patch = list(dict.fromkeys([t.module for t in patches] + ([t.module for t in old.patches] if old else [])))
    txn = _Transaction(model, state)
    try:
        if old is not None:
            txn.detach(old)
        state.records[name] = record
        for p, kind, tensors in prepared:
            txn.attach(record, p, kind, tensors)
        txn.publish_all(state)
        for module_name, loss in txn.rebuild(touched_patch).items():
            report.requant_loss[module_name] = loss
    except BaseException:
        state.records = prior_records
        txn.rollback(touched_patch)
        raise
    txn.finish()
    return report


def _hotswap(
    model: nn.Module, old: Record, prepared: list[tuple[Planned, str, dict]], adapter: Adapter, strength: float
) -> bool:
    """Copy a same-shaped adapter's values into the existing slots, keeping every tensor object."""
    if old.mode != "dynamic" or not old.active:
        return False
    by_place: dict[tuple[str, int, int], Slot] = {}
    for module_name, keys in old.wrapped.items():
        wrapper = model.get_submodule(module_name)
        for k in keys:
            slot = wrapper.slots[k]
            by_place[(module_name, slot.lo, slot.hi)] = slot
    if len(by_place) != len(prepared):
        return False
    slots: list[Slot] = []
    for p, kind, tensors in prepared:
        slot = by_place.get((p.target.module, *_rows(p)))
        if slot is None or slot.kind != kind:  # "fm1" (DoRA) and the rest: the name check below
            return False
        if set(slot.names) != set(tensors) or slot.shapes() != {k: tuple(v.shape) for k, v in tensors.items()}:
            return False
        slots.append(slot)
    if len(set(map(id, slots))) != len(slots):
        return False
    for slot, (p, _kind, tensors) in zip(slots, prepared, strict=True):
        slot.load_(tensors)
        slot.target = p.target
        slot.adapter_name = old.name
    old.adapter = adapter
    old.strength.set(strength)
    return True


def _rows(p: Planned) -> tuple[int, int]:
    return p.target.placement(p.out_features).rows


class _Transaction:
    """The mutations of one change, with what is needed to undo each."""

    def __init__(self, model: nn.Module, state: EngineState) -> None:
        self.model = model
        self.state = state
        # module name -> (wrapper, slots before, active keys before, created here)
        self.wrappers: dict[str, tuple[AdapterLinear, dict[str, Slot], list[str], bool]] = {}
        self.new_snapshots: list[str] = []

    def _wrapper(self, module_name: str, create: bool) -> AdapterLinear | None:
        if module_name in self.wrappers:
            return self.wrappers[module_name][0]
        current = self.model.get_submodule(module_name)
        created = False
        if not isinstance(current, AdapterLinear):
            if not create:
                return None
            out_f = getattr(current, "out_features", None)
            in_f = getattr(current, "in_features", None)
            if not isinstance(out_f, int) or not isinstance(in_f, int):
                out_f, in_f = current.weight.shape[0], current.weight.shape[1]
            wrapper = AdapterLinear(current, out_f, in_f)
            _set_child(self.model, module_name, wrapper)
            current, created = wrapper, True
        self.wrappers[module_name] = (current, dict(current.slots.items()), current.active_keys(), created)
        return current

    def detach(self, record: Record) -> None:
        for module_name, keys in record.wrapped.items():
            wrapper = self._wrapper(module_name, create=False)
            if wrapper is None:
                continue
            for k in keys:
                del wrapper.slots[k]

    def attach(self, record: Record, p: Planned, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        wrapper = self._wrapper(p.target.module, create=True)
        weight = getattr(p.module, "weight", None)
        dtype = slot_dtype(p.module, None)
        device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
        slot = Slot(
            record.name, p.target, record.strength, kind, tensors, _rows(p), record.compute_dtype, dtype, device
        )
        key = wrapper.new_key()
        wrapper.slots[key] = slot
        record.wrapped.setdefault(p.target.module, []).append(key)

    def publish_all(self, state: EngineState) -> None:
        """Active set of every touched wrapper = its slots in adapter order, one assignment each."""
        order: dict[str, list[str]] = {}
        for record in state.records.values():
            if not record.active:
                continue
            for module_name, keys in record.wrapped.items():
                order.setdefault(module_name, []).extend(keys)
        for module_name, (wrapper, _slots, _keys, _created) in self.wrappers.items():
            wrapper.publish([k for k in order.get(module_name, []) if k in wrapper.slots])

    def rebuild(self, module_names: list[str]) -> dict[str, float]:
        losses: dict[str, float] = {}
        by_module = _patches_by_module(self.state)
        for module_name in module_names:
            module = base_of(self.model.get_submodule(module_name))
            contribs = by_module.get(module_name, [])
            snap = self.state.snapshots.get(module_name)
            if snap is None:
                if not contribs:
                    continue
                touches_bias = any("diff_b" in t.tensors for t, _ in contribs)
                snap = merge.take_snapshot(module, backend_for(module), touches_bias)
                self.state.snapshots[module_name] = snap
                self.new_snapshots.append(module_name)
            elif snap.bias is None and any("diff_b" in t.tensors for t, _ in contribs):
                merge.restore(module, snap)  # bias untouched so far; keep it from now on
                snap.bias = module.bias.detach().clone()
            if not contribs:
                merge.restore(module, snap)
                del self.state.snapshots[module_name]
                continue
            loss = merge.rebuild(module_name, module, snap, contribs)
            if loss is not None:
                losses[module_name] = loss
        refresh_dora(self.model, module_names)  # dynamic DoRA norms are of the weight just rewritten
        return losses

    def rollback(self, patched: list[str]) -> None:
        self.state.invalidate()
        # Wrappers: put back their slots and active sets; unwrap the ones created here.
        for module_name, (wrapper, slots, keys, created) in self.wrappers.items():
            for k in list(wrapper.slots):
                if k not in slots:
                    del wrapper.slots[k]
            for k, slot in slots.items():
                if k not in wrapper.slots:
                    wrapper.slots[k] = slot
            wrapper.publish(keys)
            if created:
                _set_child(self.model, module_name, wrapper.base_layer)
        for record in self.state.records.values():
            for module_name in list(record.wrapped):
                entry = self.wrappers.get(module_name)
                if entry is not None:
                    record.wrapped[module_name] = [k for k in record.wrapped[module_name] if k in entry[1]]
        # Weights: recompute from the kept originals with the prior records (exact, deterministic).
        self.new_snapshots_restore()
        self.rebuild([m for m in patched if m in self.state.snapshots])

    def new_snapshots_restore(self) -> None:
        for module_name in self.new_snapshots:
            snap = self.state.snapshots.pop(module_name, None)
            if snap is not None:
                merge.restore(base_of(self.model.get_submodule(module_name)), snap)
        refresh_dora(self.model, self.new_snapshots)

    def finish(self) -> None:
        """Unwrap layers left without adapters, so the module tree is the original again."""
        self.state.invalidate()
        for module_name, (wrapper, _slots, _keys, _created) in self.wrappers.items():
            if len(wrapper.slots) == 0:
                wrapper.publish([])
                _set_child(self.model, module_name, wrapper.base_layer)


def _set_child(model: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _patches_by_module(state: EngineState) -> dict[str, list[tuple[Target, float]]]:
    out: dict[str, list[tuple[Target, float]]] = {}
    for record in state.records.values():
        if not record.active:
            continue
        for t in record.patches:
            out.setdefault(t.module, []).append((t, record.strength.value))
    return out


# ---------------------------------------------------------------------------------------------------
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
        touched = list(dict.fromkeys(t.module for r in records for t in r.patches))
        prior = dict(state.records)
        txn = _Transaction(model, state)
        try:
            for r in records:
                txn.detach(r)
                del state.records[r.name]
            txn.publish_all(state)
            txn.rebuild(touched)
        except BaseException:
            state.records = prior
            txn.rollback(touched)
            raise
        txn.finish()
        if not state.records:
            for module_name, snap in list(state.snapshots.items()):  # nothing left: everything goes back
                merge.restore(base_of(model.get_submodule(module_name)), snap)
            state.snapshots.clear()
            drop_state(model)  # under the lock: a waiting change sees the state is gone and starts afresh
    return names


def set_adapter_scale(model: nn.Module, name: str, scale: float) -> None:
    """Re-weight an attached adapter. Dynamic: one shared value, O(1). Merged: exact re-merge from the kept
    original of every module it touches. A scale whose delta overflows is refused in both modes."""
    if (p := _pipeline(model)) is not None:
        return p.set_scale(model, name, scale)
    model = _model_of(model)
    check_name(name)
    value = check_scale(scale)
    with _locked(model) as state:
        if state is None or name not in state.records:
            raise _not_attached([name], state)
        record = state.records[name]
        _check_strength(model, record, value)
        old = record.strength.value
        record.strength.set(value)
        if record.patches and record.active:
            touched = list(dict.fromkeys(t.module for t in record.patches))
            txn = _Transaction(model, state)
            try:
                txn.rebuild(touched)
            except BaseException:
                record.strength.set(old)
                txn.rebuild(touched)
                raise


def _check_strength(model: nn.Module, record: Record, value: float) -> None:
    """Dynamic mode's overflow rule for a new strength: free within the headroom found at apply time."""
    if not record.wrapped or abs(value) <= record.headroom:
        return
    for module_name, keys in record.wrapped.items():
        wrapper = model.get_submodule(module_name)
        for k in keys:
            slot = wrapper.slots[k]
            tensors = {n: getattr(slot, n) for n in slot.names}
            dtype = next(iter(tensors.values())).dtype
            check_dynamic(f"adapter '{record.name}', module '{slot.target.label}'", slot.kind, tensors, value, dtype)


def set_active_adapters(
    model: nn.Module, names: str | list[str] | None, weights: list[float] | None = None
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
        attached = list(state.records) if state is not None else []
        wanted = attached if asked is None else asked
        values = check_weights(weights, wanted)
        unknown = [n for n in wanted if n not in attached]
        if unknown:
            raise _not_attached(unknown, state)
        if state is None:
            return
        if values is not None:
            for name, value in zip(wanted, values, strict=True):
                _check_strength(model, state.records[name], value)
        before = {n: (r.active, r.strength.value) for n, r in state.records.items()}
        touched_merged: list[str] = []
        for name, record in state.records.items():
            record.active = name in wanted
            if values is not None and record.active:
                record.strength.set(values[wanted.index(name)])
            if record.patches and (record.active, record.strength.value) != before[name]:
                touched_merged.extend(t.module for t in record.patches)
        txn = _Transaction(model, state)
        try:
            _publish_fast(model, state)
            txn.rebuild(list(dict.fromkeys(touched_merged)))
        except BaseException:
            for name, (active, value) in before.items():
                state.records[name].active = active
                state.records[name].strength.set(value)
            _publish_fast(model, state)
            txn.rebuild(list(dict.fromkeys(touched_merged)))
            raise


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
        attached = list(state.records) if state is not None else []
        wanted = attached if asked is None else asked
        unknown = [n for n in wanted if n not in attached]
        if unknown:
            raise _not_attached(unknown, state)
        done: list[Record] = []
        try:
            for name in wanted:
                record = state.records[name]
                if record.mode != mode:
                    _reattach(model, state, record, mode)
                    done.append(record)
        except BaseException:
            for record in reversed(done):
                _reattach(model, state, record, record.mode)
            raise


def _reattach(model: nn.Module, state: EngineState, record: Record, mode: str) -> None:
    planned = plan(model, record.adapter, mode)
    report = _apply_locked(
        model, state, record.adapter, planned, record.name, mode, record.strength.value, record.compute_dtype,
        active=record.active,
    )
    _warn_requant(report, stacklevel=5)  # the caller of Adapters.fuse / unfuse


def _publish_fast(model: nn.Module, state: EngineState) -> None:
    """Re-publish every wrapper's active tuple for the current active set (one assignment per layer)."""
    names = tuple(n for n, r in state.records.items() if r.active)
    table = state.switch_cache.get(names)
    if table is None:
        if state.plan is None:
            state.plan = _switch_plan(model, state)
        on = set(names)
        table = []
        for wrapper, entries in state.plan:
            slots = tuple(s for rec_name, rec_slots in entries if rec_name in on for s in rec_slots)
            table.append((wrapper, AdapterLinear.active_state(slots)))
        if len(state.switch_cache) > 64:
            state.switch_cache.clear()
        state.switch_cache[names] = table
    for wrapper, active in table:
        wrapper.__dict__["_active"] = active  # a plain dict store: nn.Module.__setattr__ costs ~10x more


def _switch_plan(model: nn.Module, state: EngineState) -> list[tuple[AdapterLinear, list[tuple[str, tuple]]]]:
    entries: dict[str, list[tuple[str, tuple]]] = {}
    wrappers: dict[str, AdapterLinear] = {}
    for record in state.records.values():
        for module_name, keys in record.wrapped.items():
            if module_name not in wrappers:
                wrappers[module_name] = model.get_submodule(module_name)
                entries[module_name] = []
            wrapper = wrappers[module_name]
            entries[module_name].append((record.name, tuple(wrapper.slots[k] for k in keys)))
    return [(wrappers[m], entries[m]) for m in wrappers]


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


def attached(model: nn.Module, name: str) -> Record | None:
    state = get_state(_model_of(model))
    return None if state is None else state.records.get(name)
