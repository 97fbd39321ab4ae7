"""Finding what a public function works on: the transformer (or the pipeline dispatcher), and the
model's engine state with its write lock held."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from ..errors import LoRAError, _LegacyArgumentError
from ..mlx import dispatcher, is_mlx
from .gate import end_change
from .state import EngineState, Record, get_state


def _model_of(model: Any) -> nn.Module:
    """Accept a pipeline (anything with a `.transformer` module) as well as the transformer itself."""
    if isinstance(model, nn.Module) or is_mlx(model):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(inner, nn.Module):
        return inner
    raise _LegacyArgumentError(
        f"expected a torch.nn.Module (the Z-Image transformer) or a pipeline, got {type(model)}"
    )


def _pipeline(model: Any):
    """The pipeline dispatcher when `model` is a pipeline with a text encoder (see apply.pipeline), or
    the MLX engine when it is an MLX model (see zimage_lora.mlx)."""
    if (mlx_engine := dispatcher(model)) is not None:
        return mlx_engine
    from . import pipeline

    return pipeline if pipeline.components(model) is not None else None


@contextmanager
def _locked(model: nn.Module, create: bool = False) -> Iterator[EngineState | None]:
    """The model's current state with its write lock held (None: nothing attached, and not `create`).

    Every public function looks its records up inside this, never before: a state that a concurrent
    remove dropped while we waited for its lock is not used; we look again (and find the new one).
    """
    while True:
        state = get_state(model, create=create)
        if state is None:
            yield None
            return
        with state.lock:
            if get_state(model) is state:
                try:
                    yield state
                finally:
                    end_change(state.lock)  # publish the result to the forwards that start from now
                return


def _not_attached(names: list[str], state: EngineState | None) -> LoRAError:
    attached = list(state.records) if state is not None else []
    which = f"'{names[0]}'" if len(names) == 1 else str(names)
    return LoRAError(
        f"no adapter named {which} is attached; attached: {attached or 'none'}. list_adapters(model) shows them."
    )


def attached(model: nn.Module, name: str) -> Record | None:
    """The record of the adapter `name` on `model` (None when not attached); the pipeline dispatcher
    and the adapter store read it."""
    state = get_state(_model_of(model))
    return None if state is None else state.records.get(name)
