"""Checks run before the first weight changes: the caller's arguments (scale, mode, names, weights,
compute dtype), then every target: module present, shapes, values, dtype, backend support, and in
dynamic mode whether the delta fits the compute dtype. Any problem raises here, model untouched."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .. import algorithms, shapes
from ..adapter import Adapter, Target
from ..algorithms.base import amax, probe_abs_max
from ..backends import backend_for
from ..errors import IncompatibleWeightsError, InvalidArgumentError, UnsupportedError, _LegacyArgumentError
from ..fp32 import FP32_MAX, fits_fp32
from ..numerics import check_landed, headroom, require_finite
from ..placement import Placement
from .layer import AdapterLinear

MODES = ("dynamic", "merged")
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --- the caller's arguments ---------------------------------------------------------------------------
def check_scale(scale: Any, what: str = "scale", error: type[InvalidArgumentError] = _LegacyArgumentError) -> float:
    """A strength: any finite number within float32's range (strengths are applied in fp32; beyond its
    range every delta overflows: a typo, not a strength)."""
    value = None
    if not isinstance(scale, (str, bytes)):
        try:
            value = float(scale)
        except (TypeError, ValueError, OverflowError):
            pass
    if value is None:
        raise error(f"{what} must be a number, got {scale!r}")
    if not fits_fp32(value):
        raise error(
            f"{what} must be a finite number within float32's range (magnitude <= {FP32_MAX:.3g}), got {scale!r}"
        )
    return value


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise _LegacyArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    return cast(str, mode)


def check_name(name: Any, what: str = "adapter name") -> str:
    if not isinstance(name, str) or not name:
        raise _LegacyArgumentError(f"{what} must be a non-empty string, got {name!r}")
    return name


def check_names(names: Any) -> list[str]:
    """One name or an iterable of distinct names."""
    if isinstance(names, str):
        return [check_name(names)]
    if isinstance(names, (bytes, Mapping)) or not isinstance(names, Iterable):
        raise InvalidArgumentError(f"names must be a list of adapter names (or one name, or None), got {names!r}")
    out = [check_name(n) for n in names]
    repeated = sorted({n for n in out if out.count(n) > 1})
    if repeated:
        raise InvalidArgumentError(f"names lists {repeated} more than once; give each adapter once.")
    return out


def check_weights(weights: Any, names: list[str]) -> list[Any] | None:
    """None, or one finite number (or per-block mapping) per name."""
    if weights is None:
        return None
    if isinstance(weights, (str, bytes, Mapping)) or not isinstance(weights, Iterable):
        raise InvalidArgumentError(
            f"weights must be a list with one number per name ({len(names)} name(s)), got {weights!r}; "
            "Adapters(model).set_adapters takes one number for all."
        )
    weights = list(weights)
    if len(weights) != len(names):
        raise _LegacyArgumentError(f"{len(names)} adapter names but {len(weights)} weights")
    # A per-block weight (a {pattern: number} mapping) is checked when resolved against the model.
    pairs = zip(weights, names, strict=True)
    return [w if isinstance(w, Mapping) else check_scale(w, f"weight for '{n}'") for w, n in pairs]


def check_compute_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or dtype in COMPUTE_DTYPES:
        return cast("torch.dtype | None", dtype)
    raise InvalidArgumentError(
        f"compute_dtype must be None (the input's dtype) or one of torch.float16, torch.bfloat16, torch.float32, "
        f"torch.float64, got {dtype!r}."
    )


def slot_dtype(module: nn.Module, compute_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a dynamic slot on `module` keeps its tensors in and computes in."""
    if compute_dtype is not None:
        return compute_dtype
    weight = getattr(module, "weight", None)
    dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
    # float8 storage (diffusers' layerwise casting) computes in another dtype: never round factors to it.
    return torch.float32 if dtype.itemsize == 1 else dtype


@dataclass
class Checked:
    """A target checked against the model: the module it lands on (the base layer under any wrapper),
    its backend, and where on the module's rows it lands (worked out once, here)."""

    target: Target
    module: nn.Module
    backend: Any
    out_features: int
    in_features: int
    # Written into the weight even in dynamic mode (norm layers: a 1-D weight has no Linear to wrap).
    is_patch: bool
    placement: Placement


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLinear) else module


def check_targets(model: nn.Module, adapter: Adapter, mode: str, scan: bool = True) -> list[Checked]:
    """Every target checked against `model`. `scan=False`: its tensors were checked for NaN/Inf where
    they entered (the loader scans what it reads), so they are not scanned again."""
    if not isinstance(adapter, Adapter) or not isinstance(adapter.targets, list):
        raise InvalidArgumentError(f"expected an Adapter with a list of targets, got {adapter!r:.200}")
    where = f"adapter '{adapter.name}' ({adapter.source})"
    if not adapter.targets:
        raise IncompatibleWeightsError(f"{where}: no target matches a module of the model; nothing to apply.")
    out: list[Checked] = []
    for t in adapter.targets:
        out.append(_check(model, t, mode, where, scan))
    return out


def _check(model: nn.Module, t: Target, mode: str, where: str, scan: bool) -> Checked:
    if not isinstance(t, Target) or not isinstance(t.tensors, Mapping) or not isinstance(t.module, str):
        raise InvalidArgumentError(f"{where}: every target must be a Target with a module name and a dict of tensors, "
                                   f"got {t!r:.200}")
    at = f"{where}, module '{t.label}' (keys {', '.join(t.source_keys[:2]) or 'n/a'})"
    # The loader derives the scale from a checked alpha; a hand-built Target may carry anything.
    check_scale(t.scale, f"{at}: Target.scale", InvalidArgumentError)
    for what, span in (("rows", t.rows), ("delta_rows", t.delta_rows)):
        if span is not None and not (
            isinstance(span, (tuple, list)) and len(span) == 2 and all(type(i) is int for i in span)
        ):
            raise InvalidArgumentError(
                f"{at}: Target.{what} must be None or a (start, stop) pair of ints, got {span!r}"
            )
    try:
        module = base_of(model.get_submodule(t.module))
    except AttributeError:
        raise IncompatibleWeightsError(
            f"{at}: the model has no module '{t.module}'. The adapter was resolved against another model; "
            "load it with this model (apply_adapter(model, path) does)."
        ) from None
    if t.algorithm not in algorithms.names():
        raise IncompatibleWeightsError(f"{at}: unknown algorithm '{t.algorithm}'.")
    flags = algorithms.get(t.algorithm).value_roles
    for role, tensor in t.tensors.items():
        _check_tensor(at, role, tensor, scan, flag=role in flags)
    if t.dora is not None:
        _check_tensor(at, "dora magnitude", t.dora.magnitude, scan)
    backend = backend_for(module)
    weight = getattr(module, "weight", None)
    has_bias = isinstance(getattr(module, "bias", None), torch.Tensor)
    if not hasattr(module, "in_features") and isinstance(weight, torch.Tensor) and weight.dim() == 1:
        shapes.check_norm_target(at, t, tuple(weight.shape), has_bias=has_bias)  # a norm layer
        return Checked(t, module, backend, weight.shape[0], 1, True, t.placement(weight.shape[0]))
    out_f, in_f = backend.shape(module)
    shapes.check_target(at, t, out_features=out_f, in_features=in_f, has_bias=has_bias)
    if mode == "merged" and not backend.supports_merge:
        raise UnsupportedError(
            f"{at}: layers of type {type(module).__name__} ({backend.name} backend) cannot be merged into in place. "
            "Use mode='dynamic', which runs the quantized layer unchanged and adds the adapter beside it."
        )
    return Checked(t, module, backend, out_f, in_f, False, t.placement(out_f))


def _check_tensor(at: str, role: str, tensor: torch.Tensor, scan: bool, flag: bool = False) -> None:
    """`flag`: a role holding a flag (`Algorithm.value_roles`), which may be an integer."""
    if not isinstance(tensor, torch.Tensor):
        raise InvalidArgumentError(f"{at}: tensor '{role}' must be a torch.Tensor, found {type(tensor).__name__}.")
    # Only a hand-built Adapter can hold these (the loader reads dense CPU tensors).
    if tensor.layout != torch.strided or tensor.is_meta:
        kind = "a meta tensor (no data)" if tensor.is_meta else f"a {tensor.layout} tensor"
        raise InvalidArgumentError(
            f"{at}: tensor '{role}' is {kind}; an Adapter needs dense tensors holding values "
            "(.to_dense(), or load it with load_adapter)."
        )
    if not tensor.is_floating_point() and not flag:
        found = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise IncompatibleWeightsError(f"{at}: tensor '{role}' must be floating point, found {found}.")
    if scan:
        require_finite({role: tensor}, lambda key, n: f"{at}: tensor '{key}' holds {n} NaN/Inf value(s); the "
                       "adapter is broken and was not applied.")


# --- dynamic mode's overflow rule ------------------------------------------------------------------
def check_dynamic(name: str, kind: str, tensors: dict[str, torch.Tensor], strength: float, dtype: torch.dtype,
                  weight: Callable[[], torch.Tensor] | None = None) -> float:
    """Merged mode's overflow rule (`numerics.check_landed`) for a dynamic slot: its tensors, and its delta
    times `strength`, must be finite in `dtype` (the one it computes in), or every output is NaN/Inf.

    Returns the slot's headroom: the largest |strength| a cheap bound on |delta| admits, so a later
    re-weight within it needs no check. Only a strength past it builds the delta, a row block at a time.
    `weight()`: the slot's fp32 base weight rows, for a kernel whose exact check needs them (`Kernel.probe`).
    """
    for role, t in tensors.items():
        check_landed(f"{name} ({role})", t.to(dtype), dynamic=True)
    kernel = algorithms.kernel(kind)
    bias = amax(tensors["bias"]) if "bias" in tensors else 0.0
    room = headroom(dtype, max(bias, kernel.bound(tensors)))
    need = max(abs(strength), 1.0)  # the kernels form the delta at strength 1, then scale it
    if need > room:
        # Rounding is monotonic: every value stays finite in `dtype` exactly when the largest does.
        if kernel.probe and weight is not None:
            exact = max(bias, probe_abs_max(kernel, {k: v for k, v in tensors.items() if k != "bias"}, weight()))
        else:
            exact = max(bias, (kernel.abs_max or kernel.bound)(tensors))
        check_landed(name, torch.tensor([exact * need], dtype=torch.float64).to(dtype), dynamic=True)
    return room
