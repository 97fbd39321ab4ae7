"""One change to a model's adapters as a transaction.

Every change (apply, hot swap, remove, re-weight, switching the active set or the mode) mutates the
model only through a `Transaction`, opened with `change(model, state)`. The transaction keeps what
is needed to undo each mutation, and `rollback` (the only undo) puts everything back when the change
raises: the attached set and each record's fields, the wrappers' slots and active sets, the values
of hot-swapped slots, and merged weights, recomputed from the kept originals (exact, never a
subtraction). A failed change therefore leaves the model exactly as it was.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..adapter import Target
from ..backends import backend_for
from . import merge
from .layer import AdapterLinear, refresh_dora
from .slot import Slot, slot_tensors
from .state import EngineState, Record, drop_state
from .switching import publish_fast
from .validate import Checked, base_of, slot_dtype


def change(model: nn.Module, state: EngineState) -> Transaction:
    """`with change(model, state) as txn:` runs one change (the caller holds the state's lock): rolled
    back if it raises, finished if not. With no adapter left afterwards, the model's bookkeeping goes
    (see `release`). A class, not a generator: switching the active set is hot (microseconds)."""
    return Transaction(model, state)


def release(model: nn.Module, state: EngineState) -> None:
    """Nothing is attached: put back any original still kept and forget the state. Called under the
    lock, so a change waiting on it sees the state is gone and starts afresh."""
    for module_name, snap in list(state.snapshots.items()):
        merge.restore(base_of(model.get_submodule(module_name)), snap)
    state.snapshots.clear()
    drop_state(model)


class Transaction:
    """The mutations of one change, with what is needed to undo each."""

    __slots__ = ("model", "state", "records", "fields", "changed", "wrappers", "new_snapshots", "touched", "swapped",
                 "switched")

    def __init__(self, model: nn.Module, state: EngineState) -> None:
        self.model = model
        self.state = state
        # The attached set, and the fields a change sets in place on a record (O(records): switching is hot).
        self.records = dict(state.records)
        self.fields = [(r, r.active, r.strength.get(), r.adapter, r.headroom) for r in state.records.values()]
        self.changed = False  # a record was put or dropped
        # module name -> (wrapper, slots before, active keys before, created here)
        self.wrappers: dict[str, tuple[AdapterLinear, dict[str, Slot], list[str], bool]] = {}
        self.new_snapshots: list[str] = []
        self.touched: dict[str, None] = {}  # merged modules rebuilt, in order
        self.swapped: list[tuple[Slot, Target, str]] = []  # hot swaps: slot, its target and adapter before
        self.switched = False  # active tuples re-published through the switching tables

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        try:
            if exc_type is None:
                try:
                    self.finish()
                except BaseException:
                    self.rollback()  # an interrupt inside finish: the change did not happen
                    raise
            else:
                self.rollback()
        finally:
            if not self.state.records:
                release(self.model, self.state)

    # --- the attached set ------------------------------------------------------------------------
    def put(self, record: Record) -> None:
        """Attach `record` under its name (in place of the record of that name, if any)."""
        self.changed = True
        self.state.records[record.name] = record

    def drop(self, name: str) -> None:
        self.changed = True
        del self.state.records[name]

    def remove(self, records: list[Record]) -> None:
        """Detach and drop `records`: their slots go, the weights they patched are rebuilt without them."""
        if not records:
            return
        for r in records:
            self.detach(r)
            self.drop(r.name)
        self.publish_all()
        self.rebuild(list(dict.fromkeys(t.module for r in records for t in r.patches)))

    # --- dynamic mode: wrappers and their slots ---------------------------------------------------
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
                weight = cast(torch.Tensor, current.weight)
                out_f, in_f = weight.shape[0], weight.shape[1]
            wrapper = AdapterLinear(current, out_f, in_f)
            # Recorded before it is installed: an interrupt in between leaves nothing the undo misses.
            self.wrappers[module_name] = (wrapper, {}, [], True)
            _set_child(self.model, module_name, wrapper)
            return wrapper
        self.wrappers[module_name] = (current, dict(current.slots.items()), current.active_keys(), created)
        return current

    def detach(self, record: Record) -> None:
        for module_name, keys in record.wrapped.items():
            wrapper = self._wrapper(module_name, create=False)
            if wrapper is None:
                continue
            for k in keys:
                del wrapper.slots[k]

    def attach(self, record: Record, p: Checked, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        wrapper = self._wrapper(p.target.module, create=True)
        assert wrapper is not None  # create=True always gives one
        weight = getattr(p.module, "weight", None)
        dtype = slot_dtype(p.module, None)
        device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
        strength = record.strength.at(p.target.module)  # the module's own number under a per-block strength
        slot = Slot(record.name, p.target, strength, kind, tensors, p.placement, record.compute_dtype, dtype, device)
        key = wrapper.new_key()
        wrapper.slots[key] = slot
        record.wrapped.setdefault(p.target.module, []).append(key)

    def swap(self, slot: Slot, target: Target, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Hot swap: copy same-shaped values into `slot`'s own buffers (compiled graphs stay valid)."""
        # No copy of the old values is kept: the undo prepares them again from the old target (the base
        # weight under the slot does not change during a swap), so a swap that succeeds costs no clone.
        self.swapped.append((slot, slot.target, slot.adapter_name))
        slot.load_(tensors)
        # Plain attributes (no tensor, no module): set without nn.Module.__setattr__'s lookups, which
        # cost more than the copy itself on a 276-layer swap.
        vars(slot).update(target=target, adapter_name=adapter_name)

    def publish_all(self) -> None:
        """Active set of every touched wrapper = its slots in adapter order, one assignment each."""
        order: dict[str, list[str]] = {}
        for record in self.state.records.values():
            if not record.active:
                continue
            for module_name, keys in record.wrapped.items():
                order.setdefault(module_name, []).extend(keys)
        for module_name, (wrapper, _slots, _keys, _created) in self.wrappers.items():
            wrapper.publish([k for k in order.get(module_name, []) if k in wrapper.slots])

    def publish_fast(self) -> None:
        """Every wrapper's active tuple for the current active set, from the switching tables."""
        self.switched = True
        publish_fast(self.model, self.state)

    # --- merged mode: weights from the kept originals ---------------------------------------------
    def rebuild(self, module_names: list[str]) -> dict[str, float]:
        """Recompute each module's weight from its kept original and the active records' patches.
        Returns the requantization losses."""
        losses: dict[str, float] = {}
        if not module_names:
            return losses
        self.touched.update(dict.fromkeys(module_names))
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
                self.new_snapshots.append(module_name)
                self.state.snapshots[module_name] = snap
            elif snap.bias is None and any("diff_b" in t.tensors for t, _ in contribs):
                merge.restore(module, snap)  # bias untouched so far; keep it from now on
                snap.bias = cast(torch.Tensor, module.bias).detach().clone()
            if not contribs:
                # Nothing patches it any more: the original goes back (a rollback takes it again if needed).
                merge.restore(module, snap)
                del self.state.snapshots[module_name]
                continue
            loss = merge.rebuild(module_name, module, snap, contribs)
            if loss is not None:
                losses[module_name] = loss
        refresh_dora(self.model, module_names)  # dynamic DoRA norms are of the weight just rewritten
        return losses

    # --- the end of a change ----------------------------------------------------------------------
    def rollback(self) -> None:
        """Undo everything this transaction did (the only undo of the engine), also after `finish`.
        Safe to run again after an interrupt stopped it half way (see `apply.access`)."""
        state = self.state
        state.records = self.records
        for record, active, value, adapter, headroom in self.fields:
            record.active, record.adapter, record.headroom = active, adapter, headroom
            record.strength.set(value)
        for slot, target, adapter_name in reversed(self.swapped):
            base = base_of(self.model.get_submodule(target.module))
            slot.load_(slot_tensors(target, base, backend_for(base), slot.placement)[1])
            slot.target, slot.adapter_name = target, adapter_name
        state.invalidate()
        # Wrappers: put back their slots and active sets; unwrap the ones created here.
        for module_name, (wrapper, slots, keys, created) in self.wrappers.items():
            if [(k, id(s)) for k, s in wrapper.slots.items()] != [(k, id(s)) for k, s in slots.items()]:
                wrapper.slots.clear()  # the slots as they were, in their order
                wrapper.slots.update(slots)
            wrapper.publish(keys)
            # A wrapper created here goes; one that was there goes back in place (`finish` may have
            # taken it out when it emptied).
            _set_child(self.model, module_name, wrapper.base_layer if created else wrapper)
        for record in state.records.values():
            for module_name in list(record.wrapped):
                entry = self.wrappers.get(module_name)
                if entry is not None:
                    record.wrapped[module_name] = [k for k in record.wrapped[module_name] if k in entry[1]]
        if self.switched:
            publish_fast(self.model, state)
        # Weights: originals taken here go back; every touched module is recomputed with the prior
        # records, including one whose original was put back (and its snapshot dropped) before the failure.
        for module_name in self.new_snapshots:
            snap = state.snapshots.get(module_name)
            if snap is not None:  # restored, then forgotten: an interrupt in between restores it again
                merge.restore(base_of(self.model.get_submodule(module_name)), snap)
                del state.snapshots[module_name]
        refresh_dora(self.model, self.new_snapshots)
        self.new_snapshots = []
        self.rebuild(list(self.touched))

    def finish(self) -> None:
        """Unwrap layers left without adapters, so the module tree is the original again."""
        if not (self.wrappers or self.changed):
            return  # no record or slot came or went: the switching tables stay valid
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
            out.setdefault(t.module, []).append((t, record.strength.at(t.module).value))
    return out
