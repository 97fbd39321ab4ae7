"""What the MLX engine keeps on a model: the attached adapters in order, and per touched layer its
original object and stored arrays (the only source of every rebuild and of exact restore)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import torch
from mlx import nn

from ..adapter import Adapter, Target
from ..placement import Placement
from . import quant
from .layer import Slot
from .strength import Strength
from .tree import Tree, linear_shape, to_torch

_ATTR = "_zimage_lora_mlx"


@dataclass
class Record:
    name: str
    mode: str
    adapter: Adapter
    strength: Strength
    active: bool = True
    compute_dtype: mx.Dtype | None = None
    room: tuple[int, float] | None = None  # (State.version, least headroom of its slots): `strength.headroom`


@dataclass
class Layer:
    """One touched layer: the object that was in the tree and the arrays it held before any merge.
    MLX arrays are immutable, so keeping the references is an exact copy at no cost."""

    name: str  # diffusers name
    path: str  # where it sits in the MLX tree
    original: nn.Module
    kept: dict[str, mx.array]
    merged_key: tuple[Any, ...] = ()
    merged: dict[str, mx.array] | None = None  # the arrays with every merged contribution, or None
    loss: float | None = None
    slots: dict[str, list[Slot]] = field(default_factory=dict)  # adapter name -> its slots here
    wrapper: nn.Module | None = None

    @property
    def quantized(self) -> bool:
        return isinstance(self.original, nn.QuantizedLinear)

    @property
    def is_norm(self) -> bool:
        return not isinstance(self.original, (nn.Linear, nn.QuantizedLinear))

    @property
    def out_features(self) -> int:
        if self.is_norm:
            return int(self.kept["weight"].shape[0])
        return linear_shape(self.original)[0]

    def arrays(self) -> dict[str, mx.array]:
        """What the layer holds now (merged or original)."""
        return self.merged if self.merged is not None else self.kept

    def dense_weight(self) -> torch.Tensor:
        """fp32 weight under the dynamic adapters (merged ones included)."""
        a = self.arrays()
        if self.quantized:
            return to_torch(quant.decode(a, quant.Spec.of(cast(nn.QuantizedLinear, self.original))))
        return to_torch(a["weight"])

    def rows(self, placement: Placement) -> Callable[[], torch.Tensor]:
        return lambda: self.dense_weight()[placement.lo : placement.hi]

    def compute_dtype(self) -> mx.Dtype:
        if self.quantized:
            scales = self.kept["scales"]
            spec = quant.Spec.of(cast(nn.QuantizedLinear, self.original))  # `quantized`: it is one
            return scales.dtype if spec.mode == "affine" else mx.float32
        return self.kept["weight"].dtype


def kept_arrays(module: nn.Module) -> dict[str, mx.array]:
    keys = ("weight", "scales", "biases", "bias")
    return {k: module[k] for k in keys if k in module and isinstance(module[k], mx.array)}


class State:
    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.records: dict[str, Record] = {}
        self.layers: dict[str, Layer] = {}
        self.lock = threading.RLock()
        self._names: list[str] | None = None
        self.version = 0  # counts changes of the layers' slots (what cached headrooms were read from)

    def tree(self) -> Tree:
        return Tree(self.model)

    def names(self) -> list[str]:
        """The model's adaptable layers under diffusers' names (what per-block patterns match), read once."""
        if self._names is None:
            self._names = list(Tree(self.model).path)
        return self._names

    def rebind(self, record: Record) -> None:
        """Point each slot of `record` at its module's strength (after a module got a number of its own)."""
        for name, layer in self.layers.items():
            for slot in layer.slots.get(record.name, ()):
                slot.strength = record.strength.at(name)

    def layer(self, tree: Tree | None, name: str) -> Layer:
        """The layer state of `name`, created (original object and arrays kept) on first touch."""
        if name not in self.layers:
            tree = tree if tree is not None else Tree(self.model)  # a layer dropped while its adapter was off
            module = tree.get(name)
            self.layers[name] = Layer(name, tree.path[name], module, kept_arrays(module))
        return self.layers[name]

    def contributions(self) -> dict[str, list[tuple[Record, Target]]]:
        """Per layer, the active merged targets on it, in the order their adapters were applied
        (norm-weight diffs are always merged: a 1-D weight has no layer to wrap)."""
        out: dict[str, list[tuple[Record, Target]]] = {}
        for r in self.records.values():
            if not r.active:
                continue
            for t in r.adapter.targets:
                layer = self.layers.get(t.module)
                if layer is not None and (r.mode == "merged" or layer.is_norm):
                    out.setdefault(t.module, []).append((r, t))
        return out


def get_state(model: Any, create: bool = False) -> State | None:
    state = getattr(model, _ATTR, None)
    if state is None and create:
        state = State(model)
        object.__setattr__(model, _ATTR, state)
    return state


def drop_state(model: Any) -> None:
    if getattr(model, _ATTR, None) is not None:
        object.__delattr__(model, _ATTR)
