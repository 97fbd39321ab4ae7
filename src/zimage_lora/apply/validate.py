"""Checks run on every target before the first weight changes: module present, shapes, values, dtype,
backend support. Any problem raises here, with the model untouched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import algorithms
from ..adapter import ALGORITHMS, Adapter, Target
from ..backends import backend_for
from ..errors import IncompatibleWeightsError, UnsupportedError
from ..numerics import all_finite, count_nonfinite
from .layer import AdapterLinear


@dataclass
class Planned:
    """A validated target: the module it lands on (the base layer under any wrapper) and its backend."""

    target: Target
    module: nn.Module
    backend: Any
    out_features: int
    in_features: int
    # Written into the weight even in dynamic mode (norm layers: a 1-D weight has no Linear to wrap).
    is_patch: bool


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLinear) else module


def plan(model: nn.Module, adapter: Adapter, mode: str) -> list[Planned]:
    where = f"adapter '{adapter.name}' ({adapter.source})"
    if not adapter.targets:
        raise IncompatibleWeightsError(f"{where}: no target matches a module of the model; nothing to apply.")
    out: list[Planned] = []
    for t in adapter.targets:
        out.append(_check(model, t, mode, where))
    return out


def _check(model: nn.Module, t: Target, mode: str, where: str) -> Planned:
    at = f"{where}, module '{t.label}' (keys {', '.join(t.source_keys[:2]) or 'n/a'})"
    try:
        module = base_of(model.get_submodule(t.module))
    except AttributeError:
        raise IncompatibleWeightsError(
            f"{at}: the model has no module '{t.module}'. The adapter was resolved against another model; "
            "load it with this model (apply_adapter(model, path) does)."
        ) from None
    if t.algorithm not in ALGORITHMS:
        raise IncompatibleWeightsError(f"{at}: unknown algorithm '{t.algorithm}'.")
    for role, tensor in t.tensors.items():
        _check_tensor(at, role, tensor)
    if t.dora is not None:
        _check_tensor(at, "dora magnitude", t.dora.magnitude)
    backend = backend_for(module)
    weight = getattr(module, "weight", None)
    is_norm = not hasattr(module, "in_features") and isinstance(weight, torch.Tensor) and weight.dim() == 1
    if is_norm:
        diff = t.tensors.get("diff")
        if t.algorithm != "full" or diff is None or tuple(diff.shape) != tuple(weight.shape) or t.rows or t.dora:
            found = {r: list(v.shape) for r, v in t.tensors.items()}
            raise IncompatibleWeightsError(
                f"{at}: a norm layer takes only a full diff of shape {list(weight.shape)}; found {t.algorithm} {found}."
            )
        _check_bias(at, module, t, weight.shape[0], weight.shape[0])
        return Planned(t, module, backend, weight.shape[0], 1, True)
    out_f, in_f = backend.shape(module)
    lo, hi = t.rows if t.rows is not None else (0, out_f)
    if not (0 <= lo < hi <= out_f):
        raise IncompatibleWeightsError(f"{at}: rows {lo}:{hi} fall outside the module's {out_f} output rows.")
    n = hi - lo
    shapes = {r: tuple(v.shape) for r, v in t.tensors.items() if r != "diff_b"}
    d_out = n
    if shapes:
        try:
            d_out, d_in = algorithms.delta_shape(t.algorithm, shapes)
        except (ValueError, KeyError) as exc:
            raise IncompatibleWeightsError(f"{at}: inconsistent {t.algorithm} tensors: {exc}.") from None
        if d_in != in_f:
            raise IncompatibleWeightsError(
                f"{at}: the delta takes {d_in} inputs but the module has {in_f}; the adapter is for another model."
            )
        if t.delta_rows is not None:
            a, b = t.delta_rows
            if not (0 <= a < b <= d_out) or b - a != n:
                raise IncompatibleWeightsError(
                    f"{at}: delta rows {a}:{b} of a {d_out}-row delta cannot cover the module's {n} rows."
                )
        elif d_out != n:
            raise IncompatibleWeightsError(
                f"{at}: the delta has {d_out} rows but the module expects {n}; the adapter is for another model."
            )
    _check_bias(at, module, t, n, d_out)
    if t.dora is not None:
        want = n if t.dora.on_out else in_f
        if t.dora.magnitude.numel() != want:
            raise IncompatibleWeightsError(
                f"{at}: DoRA magnitude has {t.dora.magnitude.numel()} values, expected {want}."
            )
    if mode == "merged" and not backend.supports_merge:
        raise UnsupportedError(
            f"{at}: layers of type {type(module).__name__} ({backend.name} backend) cannot be merged into in place. "
            "Use mode='dynamic', which runs the quantized layer unchanged and adds the adapter beside it."
        )
    return Planned(t, module, backend, out_f, in_f, False)


def _check_tensor(at: str, role: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise IncompatibleWeightsError(f"{at}: tensor '{role}' must be floating point, found {kind}.")
    if not all_finite(tensor):
        raise IncompatibleWeightsError(
            f"{at}: tensor '{role}' holds {count_nonfinite(tensor)} NaN/Inf value(s); the adapter is broken "
            "and was not applied."
        )


def _check_bias(at: str, module: nn.Module, t: Target, n: int, d_out: int) -> None:
    db = t.tensors.get("diff_b")
    if db is None:
        return
    bias = getattr(module, "bias", None)
    if not isinstance(bias, torch.Tensor):
        raise IncompatibleWeightsError(f"{at}: the adapter has a bias diff but the module has no bias.")
    want = d_out if t.delta_rows is not None else n
    if db.numel() != want:
        raise IncompatibleWeightsError(f"{at}: the bias diff has {db.numel()} values, expected {want}.")
