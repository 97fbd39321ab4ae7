"""Adapter math, one module per algorithm, each behind the protocol in `base.py`.

Each module declares `ALGORITHM = base.Algorithm(...)`: its name, key family and priority, and pure
functions of its tensors (delta shape and rank, dense delta, bypass, row blocks for merging, an exact
split of fused rows, the dynamic-mode preparation and kernels, the memory estimate and a description).
This package holds the registry and the two compositions every algorithm shares: dynamic-mode
preparation (kernel or dense fallback, DoRA, bias) and in-place merging of a row block.
`base.py` says how to add an algorithm.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, overload

import torch

from ..placement import Placement
from . import dora as dora_math
from .base import BIAS, DENSE, Algorithm, DeltaShape, Kernel, KernelKind, Reserved, Shapes, Tensors, check_prepared
from .dora import dora_row_factor

if TYPE_CHECKING:
    from ..adapter import Dora

_BY_NAME: dict[str, Algorithm] = {}
_KERNELS: dict[str, Kernel] = {}
_ORDER: list[Algorithm] = []  # by priority; kept with the registry (read per key group of every file)


def register(algo: Algorithm) -> None:
    """Add (or replace) an algorithm and its kernels."""
    _BY_NAME[algo.name] = algo
    for k in algo.kernels:
        _KERNELS[k.name] = k
    _ORDER[:] = sorted(_BY_NAME.values(), key=lambda a: a.priority)


def unregister(name: str) -> None:
    algo = _BY_NAME.pop(name)
    for k in algo.kernels:
        _KERNELS.pop(k.name, None)
    _ORDER.remove(algo)


# Every module of this package that declares an ALGORITHM is one (dropping a module in is all it takes).
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_") and _info.name not in ("base", "dora"):
        _module = importlib.import_module(f"{__name__}.{_info.name}")
        if hasattr(_module, "ALGORITHM"):
            register(_module.ALGORITHM)
for _k in (DENSE, BIAS):
    _KERNELS[_k.name] = _k


def get(algorithm: str) -> Algorithm:
    try:
        return _BY_NAME[algorithm]
    except KeyError:
        raise ValueError(f"unknown algorithm {algorithm!r}; known: {sorted(_BY_NAME)}") from None


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def titles() -> list[str]:
    """What messages call the registered algorithms, by priority (DoRA rides on them)."""
    return [a.title or a.name for a in _ORDER] + ["DoRA"]


def by_priority() -> list[Algorithm]:
    """Algorithms in the order a module's key families pick one (the first family present wins)."""
    return _ORDER


def kernel(name: str) -> Kernel:
    return _KERNELS[name]


@overload
def delta_shape(algorithm: str, shapes: Shapes, like: tuple[int, int]) -> tuple[int, int]: ...
@overload
def delta_shape(algorithm: str, shapes: Shapes, like: None = None) -> DeltaShape: ...
def delta_shape(algorithm: str, shapes: Shapes, like: tuple[int, int] | None = None) -> DeltaShape:
    """(out, in) of the delta; a side the tensors leave open (None, e.g. IA3's vector fixes one side
    only) is taken from `like`, the shape the caller expects."""
    got = get(algorithm).delta_shape(shapes)
    if like is None or None not in got:
        return got
    return (got[0] if got[0] is not None else like[0], got[1] if got[1] is not None else like[1])


def rank(algorithm: str, shapes: dict[str, tuple[int, ...]]) -> int | None:
    return get(algorithm).rank(shapes)


def delta(algorithm: str, tensors: dict[str, torch.Tensor], weight: torch.Tensor | None = None) -> torch.Tensor:
    """Full fp32 delta (out, in), unscaled."""
    return get(algorithm).delta(tensors, weight=weight)


def bypass(algorithm: str, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """`x @ delta.T` in x's dtype, unscaled."""
    return get(algorithm).bypass(x, tensors)


def kernel_inputs(
    algorithm: str,
    tensors: dict[str, torch.Tensor],
    scale: float,
    placement: Placement,
    weight: Callable[[], torch.Tensor],
    dora: Dora | None = None,
) -> tuple[str, dict[str, torch.Tensor]]:
    """(kernel name, fp32 tensors) of one target in dynamic mode: the algorithm's own kernel where it has
    one for this placement, else its scaled dense delta rows; DoRA folded in; "bias" the kept rows of
    a bias diff. `weight()` gives the fp32 base weight rows of the placement (read only when needed)."""
    algo = get(algorithm)
    out: dict[str, torch.Tensor] = {}
    kind: str = KernelKind.BIAS
    if algo.has_weight(tensors):
        w = weight() if (algo.needs_weight or dora is not None) else None
        prepared: tuple[str, dict[str, torch.Tensor]] | None = None
        if algo.prepare is not None and (dora is None or dora.on_out):
            prepared = algo.prepare(tensors, scale, placement, w)
        if prepared is not None:
            check_prepared(prepared[0], prepared[1])
        if prepared is not None and dora is not None:
            assert w is not None  # read above whenever there is a DoRA
            folded = dora_math.fold_rows(kernel(prepared[0]), prepared[1], w, dora.magnitude)
            prepared = None if folded is None else (prepared[0], folded)
        if prepared is None:
            d_lo, d_hi = placement.delta_span
            dense = algo.delta_block(algo.row_parts(tensors), d_lo, d_hi, weight=w if algo.needs_weight else None)
            dense = dense * scale
            if dora is not None:
                assert w is not None  # read above whenever there is a DoRA
                dense = dora_math.dense_rows(dense, w, dora.magnitude, dora.on_out)
            prepared = (KernelKind.DENSE, {"delta": dense.contiguous()})
        kind, out = prepared[0], dict(prepared[1])
    if "diff_b" in tensors:
        out[Reserved.BIAS] = placement.take(tensors["diff_b"].float().reshape(-1)).contiguous()
    return kind, out


def add_rows_(rows: torch.Tensor, r0: int, algorithm: str, parts: Tensors, placement: Placement, alpha: float) -> None:
    """fp32 `rows` (module rows r0 .. r0 + len) += alpha * the delta rows that land there."""
    met = placement.clip(r0, r0 + rows.shape[0])
    if met is None:
        return
    lo, hi, d_lo, d_hi = met
    get(algorithm).add_rows(rows[lo - r0 : hi - r0], parts, d_lo, d_hi, alpha)


__all__ = [
    "Algorithm", "Kernel", "get", "names", "titles", "by_priority", "kernel", "register", "unregister",
    "delta_shape", "rank", "delta", "bypass", "kernel_inputs", "add_rows_", "dora_row_factor",
]
