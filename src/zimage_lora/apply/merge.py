"""Writing merged deltas into weights, always from the kept original.

A module's weight is a pure function of its kept original and the ordered list of deltas on it, so
adding, removing or re-weighting one merged adapter recomputes that function: exact, never a
subtraction. Plain layers are rebuilt a block of rows at a time (fp32 add, one rounding); quantized
layers go through their backend, which dequantizes, and we report how much requantizing lost.
"""

from __future__ import annotations

import math
from typing import cast

import torch

from ..adapter import Target
from ..backends import Backend, PlainLinearBackend
from ..numerics import check_landed, surely_finite
from .gate import exclude_changing
from .rows import MergeFactors, add_rows, add_scaled_
from .state import Snapshot

# About 4 MiB of fp32 per block: large enough for fast matmuls, small next to any real layer.
CHUNK_ELEMENTS = 1 << 20


def take_snapshot(module: torch.nn.Module, backend: Backend, touches_bias: bool) -> Snapshot:
    bias = getattr(module, "bias", None)
    kept_bias = bias.detach().clone() if touches_bias and isinstance(bias, torch.Tensor) else None
    return Snapshot(backend=backend, weight=backend.snapshot(module), bias=kept_bias)


def restore(module: torch.nn.Module, snap: Snapshot) -> None:
    exclude_changing()  # weights change in place: no forward may run meanwhile (apply.gate)
    snap.backend.restore(module, snap.weight)
    if snap.bias is not None:
        with torch.no_grad():
            cast(torch.Tensor, module.bias).copy_(snap.bias)


def rebuild(name: str, module: torch.nn.Module, snap: Snapshot, contribs: list[tuple[Target, float]]) -> float | None:
    """Set `module` to original + contributions (in order). Returns the requantization loss, if any."""
    exclude_changing()  # weights change in place: no forward may run meanwhile (apply.gate)
    shape = snap.backend.shape(module)
    weight = getattr(module, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else None
    factors = [(MergeFactors(t, shape[0], device), s) for t, s in contribs]
    _rebuild_bias(name, module, snap, factors)
    weighted = [(p, s) for p, s in factors if p.has_weight_delta]
    if type(snap.backend) is PlainLinearBackend:  # subclasses may requantize: they go through their backend
        return _rebuild_plain(name, module, snap, weighted)
    snap.backend.restore(module, snap.weight)
    if not weighted:
        return None
    return _rebuild_backend(name, module, snap, weighted)


def _rebuild_bias(
    name: str, module: torch.nn.Module, snap: Snapshot, factors: list[tuple[MergeFactors, float]]
) -> None:
    if snap.bias is None:
        return
    bias = cast(torch.Tensor, module.bias)  # a snapshot keeps a bias only where there is one
    with torch.no_grad():
        bias.copy_(_bias_value(snap.bias, factors))
    check_landed(name + ".bias", bias)


def _bias_value(original: torch.Tensor, factors: list[tuple[MergeFactors, float]]) -> torch.Tensor:
    bias = original.float().clone()
    for p, s in factors:
        placed = p.bias_delta()
        if placed is not None:
            lo, hi, db = placed
            bias[lo:hi].add_(db, alpha=s)
    return bias


def _vector_value(original: torch.Tensor, weighted: list[tuple[MergeFactors, float]]) -> torch.Tensor:
    """A norm's weight (1-D) plus its full diffs, fp32."""
    w = original.to(torch.float32, copy=True)
    for p, s in weighted:
        add_scaled_(w, p.parts["diff"].reshape(-1), p.target.scale, s)
    return w


def norm_values(snap: Snapshot, contribs: list[tuple[Target, float]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A norm layer's weight and bias (fp32, bias None when not kept) = kept original + contributions,
    computed as `rebuild` writes them but without touching the layer."""
    weight: torch.Tensor = snap.weight
    factors = [(MergeFactors(t, weight.shape[0], weight.device), s) for t, s in contribs]
    w = _vector_value(weight, [(p, s) for p, s in factors if p.has_weight_delta])
    return w, (_bias_value(snap.bias, factors) if snap.bias is not None else None)


def _step(shape: tuple[int, ...], weighted: list[tuple[MergeFactors, float]]) -> int:
    if any(p.target.dora is not None and not p.target.dora.on_out for p, _ in weighted):
        return shape[0]  # column norms need every row
    cols = shape[1] if len(shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    align = math.lcm(*(p.row_align for p, _ in weighted)) if weighted else 1
    if align > 1:  # blocks on multiples of every algorithm's row group (OFT's blocks), or all rows
        if any((p.placement.lo - p.placement.d0) % align for p, _ in weighted):
            return shape[0]
        step = max(align, step // align * align)
    return step


def _rebuild_plain(
    name: str, module: torch.nn.Module, snap: Snapshot, weighted: list[tuple[MergeFactors, float]]
) -> float | None:
    """Returns the rounding loss for float8 weights (e.g. diffusers' layerwise casting), else None."""
    weight = cast(torch.Tensor, module.weight)  # the plain backend: a Linear-like weight
    original: torch.Tensor = snap.weight
    if not weighted:
        with torch.no_grad():
            weight.copy_(original)
        return None
    if weight.dim() == 1:  # a norm's weight: the diff is a vector
        with torch.no_grad():
            weight.copy_(_vector_value(original, weighted))
        check_landed(name + ".weight", weight)
        return None
    rows = weight.shape[0]
    step = _step(tuple(weight.shape), weighted)
    if weight.device.type != "cpu":
        step *= 16  # accelerators: fewer, larger launches; still a small fraction of one layer
    lossy = weight.dtype.itemsize == 1  # float8: rounding loses a visible part of the delta
    spans, squares, lost, wanted = [], [], [], []
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            chunk = original[r0:r1].to(torch.float32, copy=True)
            add_rows(chunk, r0, weighted)
            weight[r0:r1].copy_(chunk)  # the one rounding into the weight's dtype
            flat = chunk.reshape(-1)
            spans.append((r0, r1))
            squares.append(torch.dot(flat, flat))
            if lossy:
                lost.append((weight[r0:r1].float() - chunk).square().sum())
                wanted.append((chunk - original[r0:r1].float()).square().sum())
    # One host sync per layer (not per block) to read every block's sum of squares.
    for (r0, r1), sq in zip(spans, torch.stack(squares).tolist(), strict=True):
        if not surely_finite(sq, weight.dtype):
            check_landed(name + ".weight", weight[r0:r1])
    if not lossy:
        return None
    delta2 = float(torch.stack(wanted).sum())
    return math.sqrt(float(torch.stack(lost).sum()) / delta2) if delta2 > 0 else 0.0


def _rebuild_backend(
    name: str, module: torch.nn.Module, snap: Snapshot, weighted: list[tuple[MergeFactors, float]]
) -> float:
    backend = snap.backend
    base = backend.get_base_weight(module).float()
    new = base.clone()
    step = _step(tuple(new.shape), weighted)
    for r0 in range(0, new.shape[0], step):
        add_rows(new[r0 : r0 + step], r0, weighted)
    check_landed(name + ".weight", new)
    delta_norm = float(torch.linalg.vector_norm(new - base))
    del base
    backend.set_base_weight(module, new)
    stored = backend.get_base_weight(module).float()
    err = float(torch.linalg.vector_norm(stored.sub_(new)))
    if delta_norm == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / delta_norm

