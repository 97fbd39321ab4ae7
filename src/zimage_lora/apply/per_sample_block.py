"""Opening and closing a per-sample block: `per_sample_adapters` (the routing itself: `per_sample`).

Opening checks the specs against the attached adapters, hangs a `Routing` on every wrapped layer and
hooks the model's forward (the batch size of each call) and its `patchify_and_embed` (each sample's
rows where the embedders see the samples' tokens concatenated); closing takes all of it off again,
also when opening failed half way. Everything happens under the engine's lock, so a forward sees
the whole routing or none of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InvalidFormatError, LoRAError
from .state import Record, get_state

if TYPE_CHECKING:
    from .per_sample import _Context

ATTR = "_zimage_lora_per_sample"
Spec = Mapping[str, Any]  # adapter name -> strength (a number or a {pattern: number} mapping)


def _batch_error(n: int, total: int) -> LoRAError:
    return LoRAError(
        f"per_sample_adapters: {n} specs but the model ran a batch of {total}; give one spec per sample "
        f"(classifier-free guidance's doubled batch of {2 * n} is matched automatically)."
    )


def check_specs(model: nn.Module, specs: Sequence[Spec]) -> tuple[list[dict[str, Any]], dict[str, Record]]:
    """Validated copies of `specs` and the records they name (each attached, dynamic, Linear-only)."""
    from .blockwise import resolve_for

    if isinstance(specs, Mapping | str) or not isinstance(specs, Sequence) or not specs:
        raise InvalidFormatError(
            f"per_sample_adapters: specs must be a non-empty list with one {{adapter: strength}} mapping per "
            f"sample, got {specs!r}"
        )
    state = get_state(model)
    attached = state.records if state is not None else {}
    out: list[dict[str, float]] = []
    records: dict[str, Record] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise InvalidFormatError(f"per_sample_adapters: spec {i} must map adapter names to strengths, got {spec!r}")
        clean: dict[str, Any] = {}
        for name, strength in spec.items():
            record = attached.get(name)
            if record is None:
                raise LoRAError(
                    f"per_sample_adapters: spec {i} names adapter '{name}', which is not attached; attached: "
                    f"{sorted(attached) or 'none'}. Attach it first with apply_adapter(model, source, name=...)."
                )
            if record.mode != "dynamic" or record.patches:
                what = "is merged into the weights" if record.mode != "dynamic" else "also changes non-Linear weights"
                raise LoRAError(
                    f"per_sample_adapters: adapter '{name}' {what}, so it acts on every sample of a batch and cannot "
                    "differ per sample. Apply it with mode='dynamic' (Linear targets only) to use it per sample."
                )
            clean[name] = resolve_for(model, record.adapter, strength, f"per_sample_adapters: spec {i}, '{name}'")
            records[name] = record
        out.append(clean)
    return out, records


def _root_hook(ctx: _Context) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
        if isinstance(x, list | tuple):
            if x and isinstance(x[0], list | tuple):
                raise LoRAError("per_sample_adapters: the omni (image-conditioned) forward is not supported.")
            total = len(x)
        elif isinstance(x, torch.Tensor):
            total = x.shape[0]
        else:
            raise LoRAError(f"per_sample_adapters: cannot find the batch in the model's input ({type(x).__name__}).")
        n = len(ctx.specs)
        if total not in (n, 2 * n):
            raise _batch_error(n, total)
        state = ctx.state
        if state is not None and any(state.records.get(k) is not r for k, r in ctx.records.items()):
            raise LoRAError(
                "per_sample_adapters: adapters the specs name were removed or replaced inside the block; "
                "attach and remove adapters outside it."
            )
        ctx.local.total = total
        ctx.local.bounds = {}

    return hook


def _patchify_recorder(model: nn.Module, ctx: _Context) -> Any:
    """The model's own `patchify_and_embed`, noting each sample's padded image and caption lengths."""
    original = model.patchify_and_embed

    def patchify_and_embed(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        images, caps = result[0], result[1]
        ctx.local.bounds = {"x": _offsets(len(t) for t in images), "cap": _offsets(len(t) for t in caps)}
        return result

    return patchify_and_embed


def _offsets(lengths: Any) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


@contextmanager
def per_sample_adapters(model: Any, specs: Sequence[Spec]) -> Iterator[None]:
    """Run each sample of the batch with exactly its own dynamic adapters inside the block.

    `specs`: one `{adapter_name: strength}` per sample (`{}`: the base model); the strength is the
    adapter's strength for that sample (the attached scale is not used). Adapters merged into the
    weights act on every sample. The model's active set is untouched: after the block the model runs
    as before it. Forwards inside the block must have a batch of `len(specs)` samples, or twice that
    under classifier-free guidance; anything else is a `LoRAError`. Eager mode (strengths are Python
    floats); one block per model at a time.
    """
    from .engine import _model_of
    from .per_sample import _Context, _routings  # that module imports this one: no top-level import

    model = _model_of(model)
    clean, records = check_specs(model, specs)
    state = get_state(model)
    ctx = _Context(clean, state, records)
    lock = state.lock if state is not None else None
    hooks: list = []
    routings: list = []
    patched = False
    if lock is not None:
        lock.__enter__()  # forwards see the routing all at once, never half of it
    try:
        if ATTR in model.__dict__:
            raise LoRAError("per_sample_adapters: a per-sample block is already open on this model (one at a time).")
        model.__dict__[ATTR] = ctx
        routings = _routings(model, ctx)
        for wrapper, routing in routings:
            wrapper.__dict__["_routing"] = routing
        hooks.append(model.register_forward_pre_hook(_root_hook(ctx), with_kwargs=True))
        if callable(getattr(model, "patchify_and_embed", None)):
            model.__dict__["patchify_and_embed"] = _patchify_recorder(model, ctx)
            patched = True
    except BaseException:
        if model.__dict__.get(ATTR) is ctx:  # never close another block's state
            _close(model, routings, hooks, patched)
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    try:
        yield
    finally:
        if lock is not None:
            with lock:
                _close(model, routings, hooks, patched)
        else:
            _close(model, routings, hooks, patched)


def _close(model: nn.Module, routings: list, hooks: list, patched: bool) -> None:
    for wrapper, _routing in routings:
        wrapper.__dict__.pop("_routing", None)
    for handle in hooks:
        handle.remove()
    if patched:
        model.__dict__.pop("patchify_and_embed", None)
    model.__dict__.pop(ATTR, None)
