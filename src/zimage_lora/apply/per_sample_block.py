"""Opening and closing a per-sample block: `per_sample_adapters` (the routing itself: `per_sample`).

Opening checks the specs against the attached adapters (and their strengths against the overflow
rule, as a re-weight would), builds a `Routing` for every wrapped layer under the change lock, and
opens the block in the caller's context (`apply.gate.BLOCKS`): forwards of the model started in that
context take the routing (`_Context.begin`), forwards elsewhere run the shared active set. While any
block is open on the model, its `patchify_and_embed` notes each sample's rows into the forward
running it (where the embedders see the samples' tokens concatenated). Closing undoes both, also
when opening failed half way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

from torch import nn

from ..errors import InvalidFormatError, LoRAError
from ..mlx.probe import refuse
from .gate import BLOCKS, current, end_change
from .state import Record, gate_of, get_state

ATTR = "_zimage_lora_per_sample"
Spec = Mapping[str, Any]  # adapter name -> strength (a number or a {pattern: number} mapping)


def _batch_error(n: int, total: int) -> LoRAError:
    return LoRAError(
        f"per_sample_adapters: {n} specs but the model ran a batch of {total}; give one spec per sample "
        f"(classifier-free guidance's doubled batch of {2 * n} is matched automatically)."
    )


def check_specs(model: nn.Module, specs: Sequence[Spec]) -> tuple[list[dict[str, Any]], dict[str, Record]]:
    """Validated copies of `specs` and the records they name (each attached, dynamic, Linear-only), each
    strength within the overflow rule of a shared re-weight (`engine._check_strength`); a per-block
    strength is resolved against the model (`blockwise.resolve_for`)."""
    from .blockwise import resolve_for
    from .engine import _check_strength

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
            _check_strength(model, record, clean[name])  # before any forward: no NaN sample
            records[name] = record
        out.append(clean)
    return out, records


def _patchify_recorder(model: nn.Module) -> Any:
    """The model's own `patchify_and_embed`, noting each sample's padded image and caption lengths into
    the per-sample forward running it (and passing through for any other)."""
    original = cast(Callable[..., Any], model.patchify_and_embed)

    def patchify_and_embed(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        fwd = current()
        if fwd is not None and fwd.routes is not None:
            images, caps = result[0], result[1]
            fwd.bounds = {"x": _offsets(len(t) for t in images), "cap": _offsets(len(t) for t in caps)}
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
    as before it, and forwards on other threads run it during the block. Forwards inside the block
    must have a batch of `len(specs)` samples, or twice that under classifier-free guidance; anything
    else is a `LoRAError`. Eager mode (strengths are Python floats); one block per model per context.
    """
    from .engine import _model_of
    from .per_sample import _Context, _routings  # that module imports this one: no top-level import

    refuse(model, "per_sample_adapters")
    model = _model_of(model)
    gate = gate_of(model)
    opened = BLOCKS.get()
    if gate in opened:
        raise LoRAError("per_sample_adapters: a per-sample block is already open on this model (one at a time).")
    state = get_state(model)
    if state is None:
        clean, records = check_specs(model, specs)
        ctx = _Context(clean, None, records)
    else:
        with state.lock:  # a consistent set of records and slots
            try:
                clean, records = check_specs(model, specs)
                ctx = _Context(clean, state, records)
                ctx.routes = _routings(model, ctx)
            finally:
                end_change(state.lock)
    token = BLOCKS.set({**opened, gate: ctx})
    try:
        _recorder(model, gate, +1)
        yield
    finally:
        BLOCKS.reset(token)
        _recorder(model, gate, -1)


def _recorder(model: nn.Module, gate: Any, step: int) -> None:
    """Install the patchify recorder with the first open block on the model, remove it with the last."""
    if not callable(getattr(model, "patchify_and_embed", None)):
        return
    with gate.mutex:
        count = gate.__dict__.get("blocks", 0) + step
        gate.__dict__["blocks"] = count
        if step > 0 and count == 1:
            model.__dict__["patchify_and_embed"] = _patchify_recorder(model)
        elif count == 0:
            model.__dict__.pop("patchify_and_embed", None)
