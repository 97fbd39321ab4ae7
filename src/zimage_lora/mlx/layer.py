"""Dynamic mode on MLX: the base layer runs untouched (still quantized) and each active adapter's share
is added into its output.

Each target's kernel inputs are made once, by its algorithm's own `kernel_inputs` in torch fp32 (scale folded in, DoRA
folded in), and converted once into the layer's compute dtype. The MLX forward then needs four
kernels: LoRA as two small matmuls (every plain LoRA of a layer as one concatenated product), LoKr
without the Kronecker product, a prepared dense delta, and a bias diff. Algorithms whose torch kernel
reads the base output or transforms the input (OFT, BOFT, IA3) run here from their prepared dense
delta rows, computed once by the same algorithm code.

The wrapper is a subclass of the base layer's own class holding the very same arrays, so the model's
parameter tree (`parameters()`, `save_weights`) is unchanged while adapters are attached; removing
the last adapter puts the original layer object back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import mlx.core as mx
import torch
from mlx import nn

from .. import algorithms
from ..adapter import Target
from ..algorithms import dora as dora_math
from ..algorithms.base import KernelKind
from ..placement import Placement
from .strength import Strength, headroom_of
from .tree import to_mx

#: Kernels with an MLX forward; any other kind runs from its dense delta rows.
MLX_KERNELS = (KernelKind.LORA, KernelKind.LOKR, KernelKind.DENSE, KernelKind.BIAS)


class Slot:
    """One target of one adapter on one layer, prepared for the MLX forward. `headroom`: the largest
    |strength| its delta is known to stay finite at in its dtype (`strength.check_dynamic_strength`)."""

    def __init__(self, target: Target, kind: str, tensors: dict[str, mx.array], placement: Placement,
                 strength: Strength, headroom: float = math.inf) -> None:
        self.target, self.kind, self.t, self.placement, self.strength = target, kind, tensors, placement, strength
        self.headroom = headroom
        self.plain_lora = kind == KernelKind.LORA and set(tensors) == {"down", "up"}

    @property
    def rows(self) -> tuple[int, int] | None:
        return None if self.placement.whole else self.placement.rows


def slot_tensors(target: Target, placement: Placement, weight: Callable[[], torch.Tensor], dtype: mx.Dtype,
                 strength: float, where: str) -> tuple[str, dict[str, mx.array], float]:
    """(kernel kind, MLX arrays in `dtype`, headroom) for one target; `weight()` gives the fp32 base rows.
    Refuses (`where` names it) a delta that overflows `dtype` at `strength`, as the PyTorch engine does."""
    algo = algorithms.get(target.algorithm)
    kind, tensors = algorithms.kernel_inputs(target.algorithm, target.tensors, target.scale, placement, weight,
                                           target.dora)
    if kind not in MLX_KERNELS:
        d_lo, d_hi = placement.delta_span
        w = weight() if (algo.needs_weight or target.dora is not None) else None
        delta = algo.delta_block(algo.row_parts(target.tensors), d_lo, d_hi, weight=w if algo.needs_weight else None)
        delta = delta * target.scale
        if target.dora is not None:
            assert w is not None
            delta = dora_math.dense_rows(delta, w, target.dora.magnitude, target.dora.on_out)
        tensors = {"delta": delta, **({"bias": tensors["bias"]} if "bias" in tensors else {})}
        kind = KernelKind.DENSE
    room = headroom_of(where, kind, tensors, strength, dtype, weight)
    return kind, {k: to_mx(v, dtype) for k, v in tensors.items()}, room


def _lora(x: mx.array, down: mx.array, up: mx.array) -> mx.array:
    return (x @ down.T) @ up.T


def _lokr(x: mx.array, w1: mx.array, w2: mx.array) -> mx.array:
    """x @ kron(w1, w2).T as two small products: (w1 @ X) @ w2.T with X the input as (i1, i2) blocks."""
    lead = x.shape[:-1]
    (o1, i1), (o2, i2) = w1.shape, w2.shape
    y = w1 @ x.reshape(-1, i1, i2)  # (n, o1, i2)
    return (y @ w2.T).reshape(*lead, o1 * o2)


def share(slot: Slot, x: mx.array, wx: mx.array | None) -> mx.array | None:
    """The slot's output rows, unscaled by its strength; None when it adds nothing to the weight path."""
    t = slot.t
    if slot.kind == KernelKind.LORA:
        y = _lora(x, t["down"], t["up"])
    elif slot.kind == KernelKind.LOKR:
        y = _lokr(x, t["w1"], t["w2"])
    elif slot.kind == KernelKind.DENSE:
        y = x @ t["delta"].T
    else:
        y = None
    if "fm1" in t:  # DoRA per output row: + (f - 1) * W x on these rows
        assert wx is not None  # the forward computes it whenever a slot has "fm1"
        part = wx if slot.placement.whole else wx[..., slot.placement.lo : slot.placement.hi]
        y = part * t["fm1"] if y is None else y + part * t["fm1"]
    if "bias" in t:
        y = t["bias"] if y is None else y + t["bias"]
    return y


def _stacked(slots: list[Slot], cache: dict[str, Any]) -> tuple[mx.array, mx.array]:
    """(down, up) of one product for every plain whole-layer LoRA slot: ranks concatenated, each up
    scaled by its strength; rebuilt only when the slots or a strength change."""
    key = tuple((id(s), s.strength.value) for s in slots)
    if cache.get("key") != key:
        cache["key"] = key
        cache["down"] = mx.concatenate([s.t["down"] for s in slots], axis=0)
        ups = [s.t["up"] * mx.array(s.strength.value, dtype=s.t["up"].dtype) for s in slots]
        cache["up"] = mx.concatenate(ups, axis=1)
    down: mx.array = cache["down"]
    up: mx.array = cache["up"]
    return down, up


class AdapterMixin:
    """Forward of a wrapped layer: the base layer's own `__call__`, then each active slot's share."""

    _zl_slots: tuple[Slot, ...]
    _zl_cache: dict[str, Any]

    def __call__(self, x: mx.array) -> mx.array:
        out: mx.array = super().__call__(x)  # type: ignore[misc]  # the base layer class is mixed in by `wrap`
        slots = self._zl_slots
        if not slots:
            return out
        wx = None
        if any("fm1" in s.t for s in slots):
            wx = out - self["bias"] if "bias" in self else out  # type: ignore[index,operator]  # an mlx Module (a dict)
        plain = [s for s in slots if s.plain_lora and s.rows is None]
        rest = [s for s in slots if not (s.plain_lora and s.rows is None)]
        if len(plain) > 1:
            down, up = _stacked(plain, self._zl_cache)
            out = out + _lora(x.astype(down.dtype), down, up).astype(out.dtype)
        else:
            rest = plain + rest
        for s in rest:
            y = share(s, x.astype(next(iter(s.t.values())).dtype), wx)
            if y is None:
                continue
            y = (y * s.strength.value).astype(out.dtype)
            if s.rows is None:
                out = out + y
            else:
                lo, hi = s.rows
                out = mx.concatenate([out[..., :lo], out[..., lo:hi] + y, out[..., hi:]], axis=-1)
        return out


_CLASSES: dict[type, type] = {}


def wrap(base: nn.Module, slots: tuple[Slot, ...]) -> nn.Module:
    """A layer of a subclass of `base`'s class holding `base`'s arrays and attributes, plus `slots`."""
    cls = type(base)
    sub = _CLASSES.get(cls)
    if sub is None:
        sub = _CLASSES[cls] = type(f"Adapter{cls.__name__}", (AdapterMixin, cls), {})
    layer: Any = cast(Any, sub).__new__(sub)  # no __init__: the base's arrays and attributes are copied in
    dict.update(layer, base)
    layer.__dict__.update(base.__dict__)
    object.__setattr__(layer, "_zl_slots", slots)
    object.__setattr__(layer, "_zl_cache", {})
    return cast(nn.Module, layer)


def is_wrapped(module: Any) -> bool:
    return isinstance(module, AdapterMixin)


def set_slots(layer: Any, slots: tuple[Slot, ...]) -> None:
    object.__setattr__(layer, "_zl_slots", slots)
