"""What `state_dict()` / `load_state_dict()` see of the norm-layer diffs of dynamic adapters.

Dynamic adapters are invisible to saving and loading. Their Linear layers are wrapped and the wrapper
saves and loads as its base (see `layer.AdapterLinear`); but a norm layer's diff has no dynamic form
and is written into the weight (a patch). For those layers the root model's hooks here save the value
without the dynamic patches (kept original plus merged adapters only), and take a loaded value as the
new original under them, so the patches stay on top. Merged adapters stay in the saved values: saving
a model with merged adapters writes the merged model.

The hooks are registered on the first dynamic apply that patches a norm layer and stay on the model
(they hold nothing and do nothing once no adapter is attached). They are on the model adapters were
applied to: a submodule's own `state_dict()` still shows the patched norm values. On a norm layer that
also holds a merged adapter, a loaded value is taken as original plus the merged share (the saved
value's meaning), so the new original is the loaded value less that share, in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapter import Target
from . import merge
from .state import EngineState, get_state
from .validate import base_of


def install(model: nn.Module) -> None:
    """Register the two root hooks once per model."""
    if any(h is _save for h in model._state_dict_hooks.values()):
        return
    model.register_state_dict_post_hook(_save)  # type: ignore[no-untyped-call]  # unannotated in torch
    model.register_load_state_dict_pre_hook(_load)  # type: ignore[no-untyped-call]  # unannotated in torch


def _dynamic_patched(state: EngineState) -> dict[str, tuple[list[tuple[Target, float]], list[tuple[Target, float]]]]:
    """Per module patched by a dynamic adapter: (merged adapters' contributions, every contribution),
    in the order the engine's rebuild adds them."""
    names = {t.module for r in state.records.values() if r.mode == "dynamic" for t in r.patches}
    out: dict[str, tuple[list[tuple[Target, float]], list[tuple[Target, float]]]] = {
        n: ([], []) for n in names if n in state.snapshots
    }
    for record in state.records.values():
        if not record.active:
            continue
        for t in record.patches:
            if t.module in out:
                merged, every = out[t.module]
                every.append((t, record.strength.at(t.module).value))
                if record.mode == "merged":
                    merged.append((t, record.strength.at(t.module).value))
    return out


def _save(model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    state = get_state(model)
    if state is None:
        return
    for name, (merged, _every) in _dynamic_patched(state).items():
        module = base_of(model.get_submodule(name))
        weight, bias = merge.norm_values(state.snapshots[name], merged)
        for leaf, value in (("weight", weight), ("bias", bias)):
            key = f"{prefix}{name}.{leaf}"
            if value is not None and key in state_dict:
                state_dict[key] = value.to(getattr(module, leaf).dtype)


def _load(
    model: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool,
    *_lists: Any,
) -> None:
    # Runs before any parameter is loaded, on load_state_dict's own copy of the caller's dict.
    state = get_state(model)
    if state is None:
        return
    for name, (merged, every) in _dynamic_patched(state).items():
        snap = state.snapshots[name]
        module = base_of(model.get_submodule(name))
        saved = dict(zip(("weight", "bias"), merge.norm_values(snap, merged), strict=True))
        keys = {leaf: f"{prefix}{name}.{leaf}" for leaf in saved}
        loaded = [leaf for leaf, value in saved.items() if value is not None and keys[leaf] in state_dict]
        if not loaded or any(not _fits(state_dict[keys[leaf]], getattr(snap, leaf)) for leaf in loaded):
            continue  # nothing for this layer, or a mismatch that load_state_dict reports itself
        for leaf in loaded:
            incoming, kept, value = state_dict[keys[leaf]], getattr(snap, leaf), saved[leaf]
            assert value is not None  # `loaded` holds the leaves with a value
            if torch.equal(incoming.to(kept.device, kept.dtype), value.to(kept.dtype)):
                continue  # what state_dict() gave: the kept original stays exactly as it is
            # The new original: the loaded value less the merged adapters' share (exact when there is none).
            share = value - kept.float()
            setattr(snap, leaf, (incoming.to(kept.device).float() - share).to(kept.dtype))
        # What the engine's rebuild writes from the originals: every patch on top.
        weight, bias = merge.norm_values(snap, every)
        for leaf, value in (("weight", weight), ("bias", bias)):
            if value is not None and keys[leaf] in state_dict:
                state_dict[keys[leaf]] = value.to(getattr(module, leaf).dtype)


def _fits(incoming: Any, kept: torch.Tensor) -> bool:
    return isinstance(incoming, torch.Tensor) and incoming.shape == kept.shape
