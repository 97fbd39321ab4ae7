"""Strengths on MLX models: one adapter's number shared by all its slots (re-weighting is one assignment),
per-block strengths (`zimage_lora.blocks`: a {pattern: number} mapping resolved against the MLX model's
layers under diffusers' names), and dynamic mode's overflow rule for a new strength (the PyTorch engine's
`apply.validate.check_dynamic`, run on the slot's own tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import torch

from ..adapter import Adapter
from ..apply.validate import check_dynamic, check_scale
from ..blocks import DEFAULT, TEXT_ENCODER_KEY, Blocks, check_patterns, is_blocks, resolve
from .tree import to_torch

if TYPE_CHECKING:
    from .layer import Slot
    from .state import Record, State

Strengthish = float | Blocks
#: MLX float dtypes as the torch dtypes the overflow rule is stated in.
TORCH_DTYPES = {mx.float32: torch.float32, mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}


class Strength:
    """One adapter's current strength. A per-block strength gives each module whose number differs from
    the default a child `Strength` of its own (`at`), kept from then on, so that later changes are
    assignments too (a slot reads the object of its module; `State.rebind` points new children's slots
    at them)."""

    def __init__(self, value: Strengthish) -> None:
        self.value = DEFAULT
        self.blocks: Blocks | None = None
        self.children: dict[str, Strength] = {}
        self.set(value)

    def set(self, value: Strengthish) -> bool:
        """Set the strength; True when a module got a child of its own (its slots need rebinding)."""
        blocks = value if isinstance(value, Blocks) else None
        self.blocks = blocks
        self.value = value.default if isinstance(value, Blocks) else float(value)
        grown = False
        if blocks is not None:
            for module, v in blocks.values.items():
                if v != self.value and module not in self.children:
                    self.children[module] = Strength(v)
                    grown = True
        for module, child in self.children.items():
            child.value = blocks.at(module) if blocks is not None else self.value
        return grown

    def get(self) -> Strengthish:
        """What `set` was given last (a number or a per-block strength)."""
        return self.blocks if self.blocks is not None else self.value

    def at(self, module: str) -> Strength:
        """The object a slot on `module` reads."""
        return self.children.get(module, self)

    def number(self, module: str) -> float:
        return self.at(module).value


def resolve_on(names: list[str], adapter: Adapter, value: Any, what: str = "scale") -> Strengthish:
    """A checked strength as the engine keeps it: a float, or `Blocks` over `adapter`'s modules, its
    patterns matched against `names` (the model's adaptable layers under diffusers' names)."""
    if not is_blocks(value):
        return check_scale(value, what)
    patterns = dict(check_patterns(value, what))
    patterns.pop(TEXT_ENCODER_KEY, None)  # an MLX model is a transformer alone
    if not patterns:
        return DEFAULT
    return resolve(patterns, names, list(dict.fromkeys(t.module for t in adapter.targets)), what)


def largest(value: Strengthish) -> float:
    if isinstance(value, Blocks):
        return max([abs(value.default), *map(abs, value.values.values())])
    return abs(value)


def slots_of(state: State, record: Record) -> Iterator[tuple[str, Slot]]:
    """(layer name, slot) of every dynamic slot `record` has."""
    for name, layer in state.layers.items():
        for slot in layer.slots.get(record.name, ()):
            yield name, slot


def headroom(state: State, record: Record) -> float:
    """The least headroom of `record`'s slots, kept on the record until the slots change (so that
    re-weighting a 276-layer adapter does not walk its slots each time)."""
    if record.room is None or record.room[0] != state.version:
        record.room = (state.version, min((s.headroom for _, s in slots_of(state, record)), default=math.inf))
    return record.room[1]


def check_dynamic_strength(state: State, record: Record, value: Strengthish) -> None:
    """Dynamic mode's overflow rule for a new strength of `record`: each slot's delta times its new number
    must be finite in the dtype it computes in; raises naming the module, changes nothing.

    Every slot passed the rule at strength max(|s|, 1) when it was made, so any |s| <= 1 is free, and
    a larger one within a slot's headroom (a cheap bound found then) too: only past it is the exact
    check run, from the slot's tensors."""
    if largest(value) <= max(1.0, headroom(state, record)):
        return
    for name, slot in slots_of(state, record):
        number = value.at(name) if isinstance(value, Blocks) else value
        if abs(number) <= slot.headroom:
            continue
        tensors = {k: to_torch(v) for k, v in slot.t.items()}  # exact: every MLX float widens into fp32
        dtype = TORCH_DTYPES[next(iter(slot.t.values())).dtype]
        layer = state.layers[name]
        rows = layer.rows(slot.placement)
        check_dynamic(f"adapter '{record.name}', module '{slot.target.label}'", slot.kind, tensors, number, dtype,
                      rows)


def headroom_of(where: str, kind: str, tensors: dict[str, torch.Tensor], strength: float, dtype: mx.Dtype,
                rows: Callable[[], torch.Tensor] | None) -> float:
    """The overflow rule for a slot about to be made (its fp32 tensors, computing in `dtype`); its headroom."""
    if dtype not in TORCH_DTYPES:
        return math.inf
    return check_dynamic(where, kind, tensors, strength, TORCH_DTYPES[dtype], rows)
