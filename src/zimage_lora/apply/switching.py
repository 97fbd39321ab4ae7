"""Fast switching between sets of active adapters: per wrapped layer, each adapter's slots, and the
active tuples of every set seen so far, so switching back to a known set is one attribute
assignment per layer and no tensor work."""

from __future__ import annotations

from typing import cast

from torch import nn

from .gate import touched
from .layer import AdapterLinear
from .slot import Slot
from .state import EngineState

# Sets remembered per model before the table starts afresh (each entry: one tuple per wrapped layer).
_MAX_SETS = 64


def publish_fast(model: nn.Module, state: EngineState) -> None:
    """Re-publish every wrapper's active tuple for the current active set (one assignment per layer)."""
    names = tuple(n for n, r in state.records.items() if r.active)
    cached = state.switch_cache.get(names)
    if cached is None:
        if state.layer_slots is None:
            state.layer_slots = layer_slots(model, state)
        on = set(names)
        table = []
        for wrapper, entries in state.layer_slots:
            slots = tuple(s for rec_name, rec_slots in entries if rec_name in on for s in rec_slots)
            table.append((wrapper, AdapterLinear.active_state(slots)))
        if len(state.switch_cache) > _MAX_SETS:
            state.switch_cache.clear()
        cached = state.switch_cache[names] = (table, dict(table))
    table, layers = cached
    for wrapper, active in table:
        wrapper.__dict__["_active"] = active  # a plain dict store: nn.Module.__setattr__ costs ~10x more
    # The layer table of the next view, ready-made (apply.gate.build_view takes it if nothing else touched).
    state.view_layers = (touched(), layers)


def layer_slots(model: nn.Module, state: EngineState) -> list[tuple[AdapterLinear, list[tuple[str, tuple[Slot, ...]]]]]:
    """Per wrapped layer: (its wrapper, [(adapter name, that adapter's slots there)] in adapter order)."""
    entries: dict[str, list[tuple[str, tuple[Slot, ...]]]] = {}
    wrappers: dict[str, AdapterLinear] = {}
    for record in state.records.values():
        for module_name, keys in record.wrapped.items():
            if module_name not in wrappers:
                wrappers[module_name] = cast(AdapterLinear, model.get_submodule(module_name))
                entries[module_name] = []
            wrapper = wrappers[module_name]
            entries[module_name].append((record.name, tuple(wrapper.slots[k] for k in keys)))
    return [(wrappers[m], entries[m]) for m in wrappers]
