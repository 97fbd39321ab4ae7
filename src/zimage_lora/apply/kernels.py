"""The backend side of the dynamic forward: LoRA fused across adapters and on Triton.

Each algorithm's own kernel (`algorithms.base.Kernel`) adds `alpha * delta(x)` into (a row block of)
the base output in torch; `add_fn` picks it, or the faster path below where this backend has one.
Writing into the base layer's output, instead of allocating a fresh full-size result and adding it,
is what keeps the dynamic overhead near the cost of the extra FLOPs. `alpha` is a Python float in
eager mode (fused into addmm) or a 0-d tensor under torch.compile (so a new value needs no recompile).

All plain LoRA adapters of a layer run as one concatenated product (`fused_lora_`, eager mode). On CUDA
(triton importable) LoRA goes through the Triton kernels in `triton_lora`: the low-rank update is added
inside each output tile in one pass. On CPU, and under torch.compile, the torch code below runs.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import Any

import torch

from .. import algorithms
from ..algorithms import lora
from ..algorithms.base import AddFn as AddFn  # re-exported
from ..algorithms.base import Alpha as Alpha
from ..algorithms.base import KernelKind, Tensors
from ..algorithms.base import dense_add_ as dense_add_
from ..algorithms.base import scaled_add_ as scaled_add_
from ..algorithms.base import scaled_addcmul_ as scaled_addcmul_

_TRITON: list[ModuleType | None] = []  # imported on first use on CUDA: CPU start-up never imports triton


def _triton(*tensors: torch.Tensor) -> ModuleType | None:
    """The Triton kernels module when they can run on `tensors` (eager mode), else None."""
    if not (tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1") or torch.compiler.is_compiling():
        return None
    if not _TRITON:
        try:
            from . import triton_lora
            _TRITON.append(triton_lora)
        except ImportError:  # pragma: no cover - depends on the install
            _TRITON.append(None)
    mod = _TRITON[0]
    if mod is None or not mod.available(*tensors):
        return None
    return mod


def _launch(mod: ModuleType, out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
            alpha: float) -> bool:
    """Run the kernel; False (and the torch path from then on) if Triton cannot build or launch it here,
    e.g. no C compiler for its launcher. A failed build or launch has written nothing."""
    try:
        mod.lora_epilogue_(out, x, down, up, alpha)
    except Exception as exc:  # noqa: BLE001 - any Triton failure means: use the torch path
        _TRITON[0] = None
        warnings.warn(f"zimage_lora: Triton LoRA kernel unavailable ({type(exc).__name__}: {exc}); "
                      "using the unfused torch path", stacklevel=3)
        return False
    return True


def _plain_lora(slot: Any, out: torch.Tensor, x: torch.Tensor) -> bool:
    """A slot the fused kernel takes as it is: plain LoRA on every row, tensors already in x's dtype."""
    if not slot.plain_lora:
        return False
    down: torch.Tensor = slot.down
    return down.dtype == x.dtype == out.dtype and down.device == x.device


def stack(factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one product equal to sum_i s_i * up_i @ down_i: A's stacked along the rank, each B
    scaled by its strength (in fp32, one rounding) and stacked alongside."""
    down = torch.cat([d for d, _u, _s in factors], dim=0)
    up = torch.cat([(u.float() * s).to(u.dtype) for _d, u, s in factors], dim=1)
    return down, up.contiguous()


def _stacked(chunk: list[Any], values: dict[Any, float] | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha) of a group of slots: the slot's own factors for one, else the concatenation,
    kept on the group's first slot and rebuilt only when a strength, a factor (hot swap) or the group
    changes. Strengths from `values` (a forward's view, see apply.gate) where given. The cache is one
    immutable tuple replaced in one assignment: forwards on other threads read the old or the new."""
    alphas = [s.strength.value if values is None else values.get(s.strength, s.strength.value) for s in chunk]
    if len(chunk) == 1:
        return chunk[0].down, chunk[0].up, alphas[0]
    key = tuple((id(s.down), s.down._version, id(s.up), s.up._version, a) for s, a in zip(chunk, alphas, strict=True))
    cached = chunk[0].__dict__.get("_stacked")
    if cached is None or cached[0] != key:
        cached = (key, *stack([(s.down, s.up, a) for s, a in zip(chunk, alphas, strict=True)]))
        chunk[0].__dict__["_stacked"] = cached
    return cached[1], cached[2], 1.0


def fused_lora_(out: torch.Tensor, x: torch.Tensor, slots: tuple[Any, ...],
                values: dict[Any, float] | None = None) -> tuple[Any, ...]:
    """Add the plain LoRA slots' shares into out (n, o) as one low-rank product with the summed rank;
    returns the slots left for the per-slot path.

    With Triton (CUDA): one kernel per `MAX_RANK` of summed rank, a single adapter included. Without:
    from two adapters on, one `x @ A^T` and one `addmm_` for all of them instead of one pair each (the
    output, by far the largest tensor, is read and written once instead of once per adapter)."""
    if len(slots) == 0 or torch.compiler.is_compiling():
        return slots
    mod = _triton(out, x)
    group = [s for s in slots if _plain_lora(s, out, x) and (mod is None or mod.supported(x, s.down.shape[0]))]
    if mod is None and len(group) < 2:
        return slots
    chunks: list[list[Any]] = [[]]
    for slot in group:
        rank = sum(s.down.shape[0] for s in chunks[-1]) + slot.down.shape[0]
        if chunks[-1] and mod is not None and rank > mod.MAX_RANK:
            chunks.append([])
        chunks[-1].append(slot)
    taken: set[int] = set()
    for chunk in chunks:
        down, up, alpha = _stacked(chunk, values)
        if mod is None:
            _torch_lora_add_(out, x, down, up, alpha)
        elif not _launch(mod, out, x, down, up, alpha):
            break  # this chunk and the rest go through the per-slot path
        taken.update(id(s) for s in chunk)
    return tuple(s for s in slots if id(s) not in taken)


def lora_add_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: Alpha) -> None:
    """out (n, o) += alpha * (x @ down.T) @ up.T; x (n, i), down (r, i), up (o, r)."""
    if not isinstance(alpha, torch.Tensor) and out.dtype == x.dtype == down.dtype:
        mod = _triton(out, x, down)
        if mod is not None and mod.supported(x, down.shape[0]) and _launch(mod, out, x, down, up, alpha):
            return
    _torch_lora_add_(out, x, down, up, alpha)


# The torch LoRA product is the algorithm's own; the name is kept so the fused path can be observed.
_torch_lora_add_ = lora.add_factors_


def _lora_kernel_add_(out: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None, t: Tensors, alpha: Alpha) -> None:
    lora_add_(out, x, t["down"], t["up"], alpha)


# Kernels with a faster path on this backend than the algorithm's torch code (Triton for LoRA).
_ACCELERATED: dict[str, AddFn] = {KernelKind.LORA: _lora_kernel_add_}


def add_fn(kind: str) -> AddFn:
    """The forward of the kernel named `kind`: the accelerated one where there is one, else the algorithm's."""
    fn = _ACCELERATED.get(kind)
    return fn if fn is not None else algorithms.kernel(kind).add_
