"""Per-model bookkeeping: which adapters are attached, the kept originals, and the change lock.

The state lives on the model as one private attribute and is deleted when the last adapter goes:
with everything removed, the model's parameters, buffers and module tree are bit-identical to before
the first apply. The model is not quite the object it was: things that hold no tensors and change no
output stay on it, the forward gate (`apply.gate.ForwardGate`, its `forward` attribute) and, once a
dynamic adapter patched a norm layer, the state_dict hooks of `apply.checkpoint`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter, Target
from ..blocks import Blocks
from .gate import ATTR, ChangeLock, ForwardGate, gate_of, touched

__all__ = ["ATTR", "EngineState", "ForwardGate", "Record", "Snapshot", "Strength", "drop_state", "gate_of",
           "get_state"]


class Strength:
    """One adapter's user scale, shared by every layer it touches: changing it is O(1) for the model.

    `value` is read by eager forwards; `tensor` (0-d fp32) by compiled ones, updated in place so a
    compiled graph sees the new value without recompiling. A per-block strength (`blocks.Blocks`)
    gives the modules whose number differs from the default a child `Strength` of their own (`at`),
    kept from then on so that later changes stay in-place fills (see `apply.blockwise`).
    """

    __slots__ = ("value", "tensor", "blocks", "children", "values")

    def __init__(self, value: float | Blocks) -> None:
        self.tensor = torch.tensor(0.0, dtype=torch.float32)
        self.children: dict[str, Strength] = {}
        self.values: torch.Tensor | None = None  # the children's numbers; each child's `tensor` is a view
        self.set(value)

    def set(self, value: float | Blocks) -> None:
        blocks = value if isinstance(value, Blocks) else None
        self.blocks = blocks
        self.value = value.default if isinstance(value, Blocks) else float(value)
        self.tensor.fill_(self.value)
        grown = False
        if blocks is not None:
            for module, v in blocks.values.items():
                if v != self.value and module not in self.children:
                    self.children[module] = Strength(v)
                    grown = True
        if not self.children:
            return
        empty: dict[str, float] = {}
        get: Callable[[str, float], float] = blocks.values.get if blocks is not None else empty.get
        numbers = [get(m, self.value) for m in self.children]
        for child, v in zip(self.children.values(), numbers, strict=True):
            child.value = v
        if grown or self.values is None:
            self._views(torch.tensor(numbers, dtype=torch.float32))
        else:
            self.values.copy_(torch.tensor(numbers, dtype=torch.float32))  # one write for every module

    def _views(self, values: torch.Tensor) -> None:
        self.values = values
        for i, child in enumerate(self.children.values()):
            child.tensor = values[i]

    def get(self) -> float | Blocks:
        """What `set` was given last (a number or a per-block strength)."""
        return self.blocks if self.blocks is not None else self.value

    def at(self, module: str) -> Strength:
        """The Strength a slot on `module` reads."""
        return self.children.get(module, self)

    def __deepcopy__(self, memo: dict[int, Any]) -> Strength:
        new = Strength(self.value)
        memo[id(self)] = new
        new.blocks = self.blocks
        new.children = {m: copy.deepcopy(c, memo) for m, c in self.children.items()}
        if new.children:
            new._views(torch.tensor([c.value for c in new.children.values()], dtype=torch.float32))
        return new


@dataclass
class Record:
    """One attached adapter."""

    name: str
    mode: str  # "merged" | "dynamic"
    adapter: Adapter
    strength: Strength
    compute_dtype: torch.dtype | None = None
    # Targets written into weights (every target in merged mode; norm patches in dynamic mode).
    patches: list[Target] = field(default_factory=list)
    # Dynamic mode: module name -> slot keys inside that module's wrapper.
    wrapped: dict[str, list[str]] = field(default_factory=dict)
    # Inactive adapters stay attached (their slots and factors kept) but add nothing.
    active: bool = True
    # Dynamic mode: the largest |strength| its slots surely stay finite at (see validate.check_dynamic).
    headroom: float = math.inf

    @property
    def scale(self) -> float:
        return self.strength.value


@dataclass
class Snapshot:
    """The exact original of one patched module: backend state of the weight, and the bias if touched."""

    backend: Any
    weight: Any
    bias: torch.Tensor | None = None


class EngineState:
    """Everything the engine keeps for one model."""

    def __init__(self, gate: ForwardGate) -> None:
        self.records: dict[str, Record] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.gate = gate
        # Switching: per wrapped layer, each adapter's slots; and the active tuples of every set seen so
        # far, so switching back to a known set is one attribute assignment per layer.
        self.layer_slots: list[tuple[Any, list[tuple[str, tuple[Any, ...]]]]] | None = None
        self.switch_cache: dict[tuple[str, ...], tuple[list[tuple[Any, tuple[Any, ...]]], dict[Any, tuple[Any, ...]]]]
        self.switch_cache = {}
        self.view_layers: tuple[int, dict[Any, tuple[Any, ...]]] | None = None  # see apply.switching.publish_fast
        self._wrappers: list[nn.Module] | None = None  # every wrapped layer, for the published view

    @property
    def lock(self) -> ChangeLock:
        return self.gate.lock

    def invalidate(self) -> None:
        """The set of wrapped layers or slots changed: forget the switching tables."""
        self.layer_slots = None
        self.switch_cache = {}
        self._wrappers = None
        self.view_layers = None
        touched()

    def wrappers(self, model: nn.Module) -> list[nn.Module]:
        """Every wrapped layer of the attached records (cached until the next `invalidate`)."""
        if self._wrappers is None:
            names = dict.fromkeys(name for r in self.records.values() for name in r.wrapped)
            self._wrappers = [model.get_submodule(name) for name in names]
        return self._wrappers

    def __deepcopy__(self, memo: dict[int, Any]) -> EngineState:
        new = EngineState.__new__(EngineState)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        new.invalidate()
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "layer_slots": None, "switch_cache": {}, "_wrappers": None, "view_layers": None}


def get_state(model: torch.nn.Module, create: bool = False) -> EngineState | None:
    state = model.__dict__.get(ATTR)
    if state is None and create:
        state = EngineState(gate_of(model))
        model.__dict__[ATTR] = state
    return state


def drop_state(model: torch.nn.Module) -> None:
    """Forget the bookkeeping once nothing is attached; the gate stays (see `ForwardGate`)."""
    model.__dict__.pop(ATTR, None)
