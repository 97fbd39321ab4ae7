"""The public functions on an MLX model (`zimage_lora.apply_adapter` and the rest dispatch here).

Same arguments, reports, errors and rules as the PyTorch engine: keys resolved by the same reader and
index, scales by the same rules, deltas by the same algorithm code in fp32 on the CPU. Every change
computes all new layers first and swaps them in only when everything succeeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import torch
from mlx import nn

from .. import algorithms, shapes
from ..adapter import Adapter
from ..apply.blockwise import check_strength, scaled
from ..apply.report import REQUANT_WARN, AdapterInfo, ApplyReport, free_name, warn_requant
from ..apply.validate import check_mode, check_name, check_names, check_weights
from ..blocks import Blocks
from ..errors import IncompatibleWeightsError, InvalidArgumentError, LoRAError
from ..loading import load_adapter
from ..numerics import require_finite
from ..sources import LoRAConfiguration
from . import build
from . import strength as strengths
from .state import Record, State, get_state
from .strength import Strength, Strengthish
from .swap import hot_swap
from .tree import Tree, linear_shape, transformer_of

__all__ = ["apply", "remove", "set_scale", "set_active", "switch_mode", "list_all", "strength_of", "REQUANT_WARN"]

_DTYPES = {torch.float32: mx.float32, torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}


def _dtype(value: Any) -> mx.Dtype | None:
    if value is None or isinstance(value, mx.Dtype) and value in (mx.float32, mx.float16, mx.bfloat16):
        return value
    if value in _DTYPES:
        return _DTYPES[value]
    raise InvalidArgumentError(f"compute_dtype must be None or a float dtype (mlx.core.float32, ...), got {value!r}")


def apply(model: nn.Module, source: str | Path | LoRAConfiguration | Adapter, *,
          scale: float | Mapping[str, float] = 1.0, mode: str = "dynamic", name: str | None = None,
          filename: str | None = None, strict: bool = False, compute_dtype: Any = None) -> ApplyReport:
    model = transformer_of(model)
    mode = check_mode(mode)
    asked = check_strength(scale)
    dtype = _dtype(compute_dtype)
    if isinstance(source, LoRAConfiguration):
        asked = scaled(asked, source.scale)
        name = name if name is not None else source.name
    explicit = name is not None
    if explicit:
        check_name(name)
    tree = Tree(model)
    if isinstance(source, Adapter):
        adapter = source
        if strict and adapter.unmatched:
            listing = "; ".join(f"{u.key}: {u.reason}" for u in adapter.unmatched[:10])
            raise IncompatibleWeightsError(f"{adapter.source}: strict mode and unmatched keys: {listing}")
    else:
        adapter = load_adapter(source, tree.index, name=name, filename=filename, strict=strict)
    _check(tree, adapter, scan=isinstance(source, Adapter))
    strength = strengths.resolve_on(list(tree.path), adapter, asked)
    name = name if name is not None else check_name(adapter.name)
    state = get_state(model, create=True)
    assert state is not None
    hotswapped = False
    with state.lock:
        notes = list(adapter.notes)
        renamed_from = None
        if not explicit:
            free = free_name(name, adapter.source,
                             lambda n: [state.records[n].adapter.source] if n in state.records else [])
            if free != name:
                notes.append(f"the name '{name}' is taken by the adapter from {state.records[name].adapter.source}; "
                             f"this one is attached as '{free}' (pass name='{name}' to replace that one instead).")
                renamed_from, name = name, free
        old = state.records.get(name)
        if old is not None:
            notes.append(f"replaced the attached adapter '{name}' (from {old.adapter.source or 'an Adapter object'}).")
        losses: dict[str, float] = {}
        if old is not None and mode == "dynamic":
            hotswapped = hot_swap(state, old, adapter, strength, dtype)
        if not hotswapped:
            record = Record(name, mode, adapter, Strength(strength), compute_dtype=dtype)
            touched = list(dict.fromkeys([t.module for t in adapter.targets]
                                         + ([t.module for t in old.adapter.targets] if old else [])))
            losses = _change(state, tree, touched, put=record)
    report = ApplyReport(name=name, mode=mode, scale=strength.default if isinstance(strength, Blocks) else strength,
                         source=adapter.source, format=adapter.format,
                         applied=[t.label for t in adapter.targets], unmatched=list(adapter.unmatched), notes=notes,
                         replaced=old is not None, hotswapped=hotswapped, renamed_from=renamed_from,
                         requant_loss={m: v for m, v in losses.items() if any(t.module == m for t in adapter.targets)
                                       and mode == "merged"})
    warn_requant(report, stacklevel=4)  # the caller of zimage_lora.apply_adapter
    return report


def _check(tree: Tree, adapter: Adapter, scan: bool) -> None:
    """Every target against the MLX layer it lands on (names, algorithm, shapes, finite values)."""
    if not isinstance(adapter, Adapter) or not adapter.targets:
        raise IncompatibleWeightsError(f"adapter {getattr(adapter, 'name', adapter)!r}: no target matches a "
                                       "module of the MLX model; nothing to apply.")
    for t in adapter.targets:
        at = f"adapter '{adapter.name}' ({adapter.source}), module '{t.label}'"
        if t.module not in tree.path:
            raise IncompatibleWeightsError(f"{at}: the MLX model has no layer '{t.module}'; load the adapter "
                                           "with this model (apply_adapter(model, path) does).")
        if t.algorithm not in algorithms.names():
            raise IncompatibleWeightsError(f"{at}: unknown algorithm '{t.algorithm}'.")
        module = tree.get(t.module)
        has_bias = "bias" in module
        if isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            out_f, in_f = linear_shape(module)
            shapes.check_target(at, t, out_features=out_f, in_features=in_f, has_bias=has_bias)
        else:
            shapes.check_norm_target(at, t, tuple(module.weight.shape), has_bias=has_bias)
        if scan:
            require_finite(dict(t.tensors), partial(_broken, at))


def _broken(at: str, key: str, n: int) -> str:
    return f"{at}: tensor '{key}' holds {n} NaN/Inf value(s); the adapter is broken and was not applied."


def _change(state: State, tree: Tree | None, touched: list[str], put: Record | None = None,
            drop: tuple[str, ...] = (), dynamic: tuple[Record, ...] = ()) -> dict[str, float]:
    """Compute every touched layer with `put` attached, `drop` detached and `dynamic` records given fresh
    slots, then commit; on any error nothing (records, layers, tree) has changed."""
    saved_records = dict(state.records)
    new_layers = [n for n in touched if n not in state.layers]
    saved_slots = {n: dict(lay.slots) for n, lay in state.layers.items()}
    try:
        for n in drop:
            state.records.pop(n, None)
        if put is not None:
            state.records.pop(put.name, None)
            state.records[put.name] = put
        for n in touched:
            layer = state.layer(tree, n)
            for n_drop in (*drop, *([put.name] if put is not None else [])):
                layer.slots.pop(n_drop, None)
        for r in ([put] if put is not None and put.mode == "dynamic" else []) + list(dynamic):
            for n in dict.fromkeys(t.module for t in r.adapter.targets):
                layer = state.layers[n]
                layer.slots[r.name] = build.make_slots(layer, r)
        changes = build.compute_changes(state, touched)
    except BaseException:
        state.records.clear()
        state.records.update(saved_records)
        for n in new_layers:
            state.layers.pop(n, None)
        for n, slots in saved_slots.items():
            if n in state.layers:
                state.layers[n].slots = slots
        raise
    return build.commit(state, changes)


def _records(model: nn.Module, names: list[str] | None) -> tuple[State | None, list[str]]:
    state = get_state(model)
    attached = list(state.records) if state is not None else []
    wanted = attached if names is None else names
    unknown = [n for n in wanted if n not in attached]
    if unknown:
        which = f"'{unknown[0]}'" if len(unknown) == 1 else str(unknown)
        raise LoRAError(f"no adapter named {which} is attached; attached: {attached or 'none'}. "
                        "list_adapters(model) shows them.")
    return state, wanted


def remove(model: nn.Module, name: str | None = None) -> list[str]:
    model = transformer_of(model)
    if name is not None:
        check_name(name)
    state, names = _records(model, None if name is None else [name])
    if state is None or not names:
        return []
    with state.lock:
        touched = [t.module for n in names for t in state.records[n].adapter.targets]
        _change(state, None, touched, drop=tuple(names))
    return names


def set_scale(model: nn.Module, name: str, scale: float | Mapping[str, float]) -> None:
    model = transformer_of(model)
    check_name(name)
    asked = check_strength(scale)
    state, _ = _records(model, [name])
    assert state is not None
    with state.lock:
        record = state.records[name]
        value = strengths.resolve_on(state.names(), record.adapter, asked)
        strengths.check_dynamic_strength(state, record, value)  # before anything changes
        before = record.strength.get()
        _set(state, record, value)  # dynamic slots read it at their next forward: O(1)
        if record.mode == "merged" or any(state.layers.get(t.module) and state.layers[t.module].is_norm
                                          for t in record.adapter.targets):
            try:
                _change(state, None, [t.module for t in record.adapter.targets])
            except BaseException:
                _set(state, record, before)
                raise


def _set(state: State, record: Record, value: Strengthish) -> None:
    if record.strength.set(value):
        state.rebind(record)


def set_active(model: nn.Module, names: str | list[str] | None,
               weights: list[float | Mapping[str, float]] | None = None) -> None:
    model = transformer_of(model)
    asked = None if names is None else check_names(names)
    state, wanted = _records(model, asked)
    values = check_weights(weights, wanted)
    if state is None:
        return
    with state.lock:
        resolved: dict[str, Strengthish] = {}
        if values is not None:
            for n, v in zip(wanted, values, strict=True):  # every check before any change
                record = state.records[n]
                checked = check_strength(v, f"weight for '{n}'")
                resolved[n] = strengths.resolve_on(state.names(), record.adapter, checked)
                strengths.check_dynamic_strength(state, record, resolved[n])
        before = {n: (r.active, r.strength.get()) for n, r in state.records.items()}
        touched = []
        for n, r in state.records.items():
            r.active = n in wanted
            if n in resolved:
                _set(state, r, resolved[n])
            if (r.active, r.strength.get()) != before[n]:
                touched += [t.module for t in r.adapter.targets]
        try:
            _change(state, None, touched)
        except BaseException:
            for n, (active, value) in before.items():
                state.records[n].active = active
                _set(state, state.records[n], value)
            raise


def switch_mode(model: nn.Module, names: str | list[str] | None, mode: str) -> None:
    model = transformer_of(model)
    mode = check_mode(mode)
    asked = None if names is None else check_names(names)
    state, wanted = _records(model, asked)
    if state is None:
        return
    with state.lock:
        moved = [state.records[n] for n in wanted if state.records[n].mode != mode]
        for r in moved:
            r.mode = mode
        try:
            _change(state, None, [t.module for r in moved for t in r.adapter.targets],
                    dynamic=tuple(r for r in moved if mode == "dynamic"))
        except BaseException:
            for r in moved:
                r.mode = "merged" if mode == "dynamic" else "dynamic"
            raise
    for r in moved:
        if mode == "merged":
            layers = [state.layers[m] for m in dict.fromkeys(t.module for t in r.adapter.targets) if m in state.layers]
            warn_requant(ApplyReport(name=r.name, mode=mode, scale=r.strength.value,
                                     requant_loss={lay.name: lay.loss for lay in layers if lay.loss is not None}),
                         stacklevel=4)


def strength_of(model: nn.Module, name: str) -> Strengthish | None:
    """The strength the adapter `name` was last given (a number or a per-block one); None: not attached."""
    state = get_state(transformer_of(model))
    record = state.records.get(name) if state is not None else None
    return record.strength.get() if record is not None else None


def list_all(model: nn.Module) -> list[AdapterInfo]:
    model = transformer_of(model)
    state = get_state(model)
    if state is None:
        return []
    return [AdapterInfo(name=r.name, mode=r.mode, scale=r.strength.value, active=r.active, source=r.adapter.source,
                        format=r.adapter.format, modules=len(r.adapter.modules), algorithms=tuple(r.adapter.algorithms))
            for r in list(state.records.values())]
