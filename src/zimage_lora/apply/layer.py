"""The dynamic-mode layer: the original Linear, untouched, plus every adapter attached to it.

`AdapterLinear` calls its `base_layer` (so quantized kernels run as they are) and adds each active
adapter's delta into the base output in place. The active set is one immutable tuple replaced in a
single assignment; inside a forward of the model each layer reads its set and strengths from the
view that forward took at its start (`apply.gate`), so the forward sees one state of the whole model.

The wrapper is invisible to `state_dict()` / `load_state_dict()`: it saves and loads its base's
entries under its own prefix (`x.weight`, not `x.base_layer.weight`) and the slots hold only
non-persistent buffers, so a model with dynamic adapters saves the base checkpoint exactly and a
base checkpoint loads into it with the adapters kept on top.
"""

from __future__ import annotations

from collections.abc import ItemsView, ValuesView
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..backends import backend_for
from . import kernels
from .gate import SERIAL, current, exclude_changing, touched
from .slot import Slot, slot_tensors
from .state import Strength


class AdapterLinear(nn.Module):
    """A Linear-like layer with adapters: `base_layer(x) + sum_i s_i * delta_i(x)`."""

    def __init__(self, base_layer: nn.Module, out_features: int, in_features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.slots = SlotDict()
        self.out_features = out_features
        self.in_features = in_features
        # `active_state`: (slots in order, whether any needs the base output without bias, whether any
        # transforms the input). Replaced, never mutated.
        self._active: tuple[tuple[Slot, ...], bool, bool] = ((), False, False)
        self._next_key = 0
        self._serial = next(SERIAL)  # creation order, against the views of running forwards (apply.gate)
        self.register_state_dict_post_hook(_as_base_state)  # type: ignore[no-untyped-call]  # unannotated in torch
        self.register_load_state_dict_post_hook(_after_load)  # type: ignore[no-untyped-call]  # unannotated in torch

    @property
    def weight(self) -> torch.Tensor:
        return cast(torch.Tensor, self.base_layer.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules"):
                raise
            return getattr(self._modules["base_layer"], name)

    # -- slots ------------------------------------------------------------------------------------
    def new_key(self) -> str:
        self._next_key += 1
        return f"s{self._next_key}"

    def publish(self, order: list[str]) -> None:
        """Make the slots named in `order` the active set, in one assignment."""
        self.set_active(tuple(self.slots[k] for k in order))

    @staticmethod
    def active_state(slots: tuple[Slot, ...]) -> tuple[tuple[Slot, ...], bool, bool]:
        return slots, any(s.needs_wx for s in slots), any(s.transforms_input for s in slots)

    def set_active(self, slots: tuple[Slot, ...]) -> None:
        if not self.slots:
            exclude_changing()  # about to be unwrapped: forwards that took a view with it must finish first
        touched()
        self._active = self.active_state(slots)

    def active_keys(self) -> list[str]:
        by_id = {id(m): k for k, m in self.slots.items()}
        return [by_id[id(s)] for s in self._active[0]]

    def refresh_dora(self) -> None:
        """Recompute every DoRA slot's factors (and those of algorithms prepared from the base weight)
        from the weight as it is now.

        DoRA's row norm is of the whole weight under the adapter (base plus any merged deltas), so it
        goes stale when a merge, remove, restore or load changes that weight. Values are copied into
        the existing buffers, so compiled graphs stay valid.
        """
        slots = [s for s in self.slots.values() if s.target.dora is not None or s.reads_weight]
        if not slots:
            return
        base = self.base_layer
        backend = backend_for(base)
        with torch.no_grad():
            for slot in slots:
                _kind, tensors = slot_tensors(slot.target, base, backend, slot.placement)
                slot.load_(tensors)

    # -- state_dict: as if unwrapped --------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing: list[str],
        unexpected: list[str],
        errors: list[str],
    ) -> None:
        # A checkpoint of the unwrapped model names the base's entries `prefix + name`: hand them to
        # base_layer (loaded next, from this same dict). Keys already under `base_layer.` are kept.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            head = key[len(prefix) :].split(".", 1)[0]
            inner = prefix + _BASE + key[len(prefix) :]
            if head not in self._modules and inner not in state_dict:
                state_dict[inner] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        fwd = None if compiling else current()
        if fwd is None:  # compiled, or called outside a forward of the model: this layer's own current set
            slots, needs_wx, transforms = self._active
            values = None
        else:
            if fwd.routes is not None:  # inside a per-sample block (apply.per_sample): its routing only
                out: torch.Tensor = self.base_layer(x, *args, **kwargs)
                routing = fwd.routes.get(self)
                return out if routing is None else routing.add_(self, out, x, fwd)
            state = fwd.view.layers.get(self)
            if state is None:  # wrapped after this forward took its view: nothing; another model's: its own
                state = _QUIET if self._serial > fwd.view.serial else self._active
            slots, needs_wx, transforms = state
            values = fwd.view.values
        base_x = x
        if transforms:
            # Kernels that act on the input (x -> x + alpha * g(x)) share the one base call; wx below is
            # then of the transformed input, as merging those adapters first would give.
            for slot in slots:
                if slot.transforms_input:
                    base_x = base_x + slot.shift(x, _alpha(slot, values, compiling))
        out = self.base_layer(base_x, *args, **kwargs)
        if not slots:
            return out
        out, out2, x2, wx = rows_of(out, x, self.bias if needs_wx else None, needs_wx)
        if not compiling:
            slots = kernels.fused_lora_(out2, x2, slots, values)  # plain LoRA slots as one product (Triton on CUDA)
        for slot in slots:
            slot.add_(out2, x2, wx, _alpha(slot, values, compiling))
        return out

    def extra_repr(self) -> str:
        names = ", ".join(s.adapter_name for s in self._active[0])
        return f"adapters=[{names}]"


if TYPE_CHECKING:
    class SlotDict(nn.ModuleDict):
        """What `AdapterLinear.slots` holds: a ModuleDict of Slots, typed as such."""

        def __getitem__(self, key: str) -> Slot: ...
        def values(self) -> ValuesView[Slot]: ...
        def items(self) -> ItemsView[str, Slot]: ...
else:
    SlotDict = nn.ModuleDict  # the plain ModuleDict at run time


_BASE = "base_layer."
_QUIET: tuple[tuple[Slot, ...], bool, bool] = ((), False, False)


def rows_of(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, needs_wx: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The base output made contiguous, its rows and the input's as 2-D views (the kernels add into the
    rows in place), and the base output without bias (`wx`) where a kernel reads it."""
    if not out.is_contiguous():
        out = out.contiguous()
    out2 = out.view(-1, out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    wx = None
    if needs_wx:
        wx = out2 - bias if bias is not None else out2.clone()
    return out, out2, x2, wx


def _alpha(slot: Slot, values: dict[Strength, float] | None, compiling: bool) -> kernels.Alpha:
    """The slot's strength: from the forward's view, else the current value (a tensor when compiling)."""
    if values is not None:
        return values.get(slot.strength, slot.strength.value)
    return slot.strength.tensor if compiling else slot.strength.value


def _as_base_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """state_dict post-hook of `AdapterLinear`: the base's entries under the wrapper's prefix.

    The wrapper's subtree is the tail of `state_dict` when this runs, so popping and re-inserting its
    keys keeps the unwrapped model's order. The per-module `_metadata` (versions) is renamed alike and
    the slots' entries dropped, so the result is the unwrapped model's state dict exactly.
    """
    inner = prefix + _BASE
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    meta = getattr(state_dict, "_metadata", None)
    if meta is None:
        return
    slots = prefix + "slots"
    for key in [k for k in meta if k == inner[:-1] or k.startswith(inner) or k == slots or k.startswith(slots + ".")]:
        value = meta.pop(key)
        if key == inner[:-1]:
            meta[prefix[:-1]] = value  # the wrapper's own entry: replaced in place, keeping its position
        elif key.startswith(inner):
            meta[prefix + key[len(inner) :]] = value


def _after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict post-hook of `AdapterLinear`: the loaded weight is the new base under the adapters."""
    cast(AdapterLinear, module).refresh_dora()


def refresh_dora(model: nn.Module, module_names: list[str]) -> None:
    """Re-prepare the DoRA slots of these layers after their weights changed (merge, remove, restore)."""
    for name in module_names:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLinear):
            module.refresh_dora()
