"""Hot swap on MLX: an adapter applied under the name of an attached dynamic one with the same layout
(same layers, rows, kernels, tensor names, shapes and dtypes) takes its place by having its prepared
arrays put into the existing slots. The wrapper layers, the slot objects and the record stay (a caller
holding them sees the new adapter), and nothing else is rebuilt. Anything else is attached afresh."""

from __future__ import annotations

import mlx.core as mx

from ..adapter import Adapter
from .build import make_slots
from .layer import Slot
from .state import Record, State
from .strength import Strength, Strengthish


def _signature(slot: Slot) -> tuple[int, int, str, tuple[tuple[str, tuple[int, ...], mx.Dtype], ...]]:
    tensors = tuple(sorted((k, tuple(v.shape), v.dtype) for k, v in slot.t.items()))
    return slot.placement.lo, slot.placement.hi, slot.kind, tensors


def hot_swap(state: State, old: Record, adapter: Adapter, strength: Strengthish, dtype: mx.Dtype | None) -> bool:
    """Put `adapter` (at `strength`) into `old`'s slots; False, with nothing changed, when the layouts
    differ. Raises, with nothing changed, what making the new slots raises (the overflow rule)."""
    if old.mode != "dynamic" or not old.active or dtype != old.compute_dtype:
        return False
    modules = list(dict.fromkeys(t.module for t in adapter.targets))
    if set(modules) != {t.module for t in old.adapter.targets}:
        return False
    layers = [state.layers.get(m) for m in modules]
    if any(lay is None or lay.is_norm for lay in layers):
        return False  # a norm diff is merged in both modes: no slot to swap into
    trial = Record(old.name, "dynamic", adapter, Strength(strength), compute_dtype=dtype)
    pairs: list[tuple[Slot, Slot]] = []
    for layer in layers:
        assert layer is not None
        have = sorted(layer.slots.get(old.name, []), key=_signature)
        new = sorted(make_slots(layer, trial), key=_signature)
        signatures = [_signature(s) for s in have]
        if signatures != [_signature(s) for s in new] or len(set(signatures)) != len(signatures):
            return False
        pairs += zip(have, new, strict=True)
    for slot, new_slot in pairs:  # from here nothing can fail
        slot.target, slot.t, slot.headroom = new_slot.target, new_slot.t, new_slot.headroom
    for layer in layers:
        assert layer is not None
        if layer.wrapper is not None:
            layer.wrapper._zl_cache.clear()  # the stacked product of its LoRAs holds the old arrays
    old.adapter = adapter
    state.version += 1
    if old.strength.set(strength):
        state.rebind(old)
    return True
