"""One adapter on one wrapped layer (`Slot`): its prepared tensors as non-persistent buffers and its
share of the layer's forward; and what a slot holds for a target (`slot_tensors`, read from the base
weight rows its placement lands on, `weight_rows`). The layer that carries slots is `apply.layer`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

from .. import algorithms
from ..adapter import Target
from ..algorithms.base import KernelKind, Reserved, scaled_add_, scaled_addcmul_
from ..placement import Placement
from . import kernels
from .gate import exclude_changing
from .state import Strength


def weight_rows(base: nn.Module, backend: Any, placement: Placement) -> Callable[[], torch.Tensor]:
    """The fp32 base weight rows a placement lands on, read (dequantized) only when called: only
    weight-reading algorithms, DoRA and exact overflow checks need them."""
    lo, hi = placement.rows
    return lambda: backend.get_base_weight(base).float()[lo:hi]


def slot_tensors(
    target: Target, base: nn.Module, backend: Any, placement: Placement
) -> tuple[str, dict[str, torch.Tensor]]:
    """(kernel name, fp32 tensors) a slot holds for one target at its placement (computed once, by
    validation): what `algorithms.kernel_inputs` makes of it on this layer."""
    return algorithms.kernel_inputs(
        target.algorithm, target.tensors, target.scale, placement, weight_rows(base, backend, placement), target.dora,
    )


class Slot(nn.Module):
    """One adapter on one layer: its prepared tensors as non-persistent buffers (they follow `.to()`
    but never appear in the state_dict)."""

    # LoRA's prepared tensors (`KernelKind.LORA`), read as attributes by the fused and batched products.
    down: torch.Tensor
    up: torch.Tensor

    def __init__(
        self,
        adapter_name: str,
        target: Target,
        strength: Strength,
        kind: str,
        tensors: dict[str, torch.Tensor],
        placement: Placement,
        compute_dtype: torch.dtype | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.adapter_name = adapter_name
        self.target = target
        self.strength = strength
        self.kind = kind
        self.placement = placement
        # Read on every forward: worked out once here, not per call.
        self.whole = placement.whole
        self.span = slice(placement.lo, placement.hi)
        self.compute_dtype = compute_dtype
        kernel = algorithms.kernel(kind)
        self.needs_wx = kernel.uses_wx or Reserved.DORA_FM1 in tensors  # the base output without bias, "wx"
        # Plain LoRA on every row, nothing else: what the fused and the per-sample batched products take.
        self.plain_lora = kind == KernelKind.LORA and not self.needs_wx and Reserved.BIAS not in tensors and self.whole
        self.transforms_input = kernel.transform is not None  # base(x + alpha * g(x)) (see forward)
        # Prepared from the base weight (as DoRA is): re-prepared when that weight changes.
        self.reads_weight = algorithms.get(target.algorithm).needs_weight
        self.names = tuple(tensors)
        # A hot swap writes into these buffers in place, so none may share memory with the caller's Adapter.
        theirs = {t.untyped_storage().data_ptr() for t in target.tensors.values()}
        for key, value in tensors.items():
            buf = value.to(device=device, dtype=compute_dtype or dtype)
            if buf.untyped_storage().data_ptr() in theirs:
                buf = buf.clone()
            self.register_buffer(key, buf, persistent=False)

    @property
    def lo(self) -> int:
        return self.placement.lo

    @property
    def hi(self) -> int:
        return self.placement.hi

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(getattr(self, k).shape) for k in self.names}

    def load_(self, tensors: dict[str, torch.Tensor]) -> None:
        """Hot swap: copy new values into the existing buffers (same shapes), keeping compiled graphs valid."""
        exclude_changing()  # in place: no forward may run meanwhile
        for key in self.names:
            getattr(self, key).copy_(tensors[key])

    def recast(self, dtype: torch.dtype, device: torch.device) -> None:
        # One assignment of a new buffer dict: a forward running on another thread keeps the dict it read.
        new = cast("dict[str, torch.Tensor]", dict(self._buffers))
        for key in self.names:
            new[key] = new[key].to(device=device, dtype=dtype)
        self.__dict__["_buffers"] = new

    def _ready(self, x: torch.Tensor) -> tuple[torch.dtype, dict[str, torch.Tensor]]:
        """The dtype this slot computes in for input x, and its tensors in it (recast on the first call
        with a new dtype or device: once, not per call)."""
        # Every buffer of a slot is a tensor (registered in __init__, never None).
        t = cast("dict[str, torch.Tensor]", self._buffers)
        probe = t[self.names[0]]
        want = self.compute_dtype or x.dtype
        if probe.dtype != want or probe.device != x.device:
            self.recast(want, x.device)
            t = cast("dict[str, torch.Tensor]", self._buffers)
        return want, t

    def shift(self, x: torch.Tensor, alpha: kernels.Alpha) -> torch.Tensor:
        """alpha * g(x) of an input-transforming kernel, in x's dtype and shape."""
        want, t = self._ready(x)
        transform = algorithms.kernel(self.kind).transform
        assert transform is not None  # only slots with `transforms_input` shift
        g = transform(x.reshape(-1, x.shape[-1]).to(want), t)
        shifted: torch.Tensor = (g * alpha).to(x.dtype).reshape(x.shape)
        return shifted

    def add_(self, out: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None, alpha: kernels.Alpha) -> None:
        """out (n, out_features) += this adapter's share for input x (n, in_features)."""
        want, t = self._ready(x)
        rows = out if self.whole else out[:, self.span]
        if want != out.dtype or want != x.dtype:
            acc = torch.zeros(rows.shape, dtype=want, device=out.device)
            xs = x.to(want)
            wxs = wx.to(want) if wx is not None else None
            self._add(t, acc, xs, wxs, alpha)
            rows.add_(acc.to(out.dtype))
        else:
            self._add(t, rows, x, wx, alpha)

    def _add(self, t: dict[str, torch.Tensor], rows: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None,
             alpha: kernels.Alpha) -> None:
        part = None
        if self.needs_wx:
            assert wx is not None  # the layer computes wx when any active slot needs it
            part = wx if self.whole else wx[:, self.span]
        kernels.add_fn(self.kind)(rows, x, part, t, alpha)
        if Reserved.DORA_FM1 in t:  # DoRA per output row: + alpha * (f - 1) * W x
            assert part is not None  # DORA_FM1 sets needs_wx
            scaled_addcmul_(rows, part, t[Reserved.DORA_FM1], alpha)
        if Reserved.BIAS in t:
            scaled_add_(rows, t[Reserved.BIAS], alpha)
