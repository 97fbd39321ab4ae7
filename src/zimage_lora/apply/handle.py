"""An object-style handle over the engine's functions, shaped like diffusers' adapter methods."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter import Adapter
from ..errors import LoRAError
from ..sources import LoRAConfiguration
from .engine import (
    _model_of,
    apply_adapter,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)
from .per_sample import per_sample_adapters
from .report import AdapterInfo, ApplyReport
from .state import get_state


class Adapters:
    """`Adapters(model)`: load, switch, re-weight, fuse and unload adapters on one model.

    It keeps no state of its own (everything lives on the model), so several handles on the same
    model agree, and the module-level functions can be mixed with it freely.
    """

    def __init__(self, model: Any) -> None:
        self.model: nn.Module = _model_of(model)

    def load(
        self,
        source: str | Path | LoRAConfiguration | Adapter,
        name: str | None = None,
        *,
        scale: float = 1.0,
        mode: str = "dynamic",
        **kwargs: Any,
    ) -> ApplyReport:
        return apply_adapter(self.model, source, scale=scale, mode=mode, name=name, **kwargs)

    def set_adapters(self, names: str | Sequence[str], weights: float | Sequence[float] | None = None) -> None:
        """Activate exactly `names` (with `weights`); the other attached adapters stay loaded but off."""
        names = [names] if isinstance(names, str) else list(names)
        if weights is not None and not isinstance(weights, Sequence):
            weights = [float(weights)] * len(names)
        set_active_adapters(self.model, names, list(weights) if weights is not None else None)

    def set_scale(self, name: str, scale: float) -> None:
        set_adapter_scale(self.model, name, scale)

    def fuse(self, names: str | Sequence[str] | None = None) -> None:
        """Merge dynamic adapters into the weights (exactly restorable with `unfuse` or `unload`)."""
        self._switch_mode(names, "merged")

    def unfuse(self, names: str | Sequence[str] | None = None) -> None:
        """Take merged adapters back out of the weights (from the kept originals) and run them dynamic."""
        self._switch_mode(names, "dynamic")

    def unload(self, names: str | Sequence[str] | None = None) -> None:
        if names is None:
            remove_adapter(self.model)
            return
        for name in [names] if isinstance(names, str) else names:
            remove_adapter(self.model, name)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model inside the block; the adapters that were active come back after it."""
        before = [a.name for a in self.list() if a.active]
        set_active_adapters(self.model, [])
        try:
            yield
        finally:
            set_active_adapters(self.model, before)

    def per_sample(self, specs: Sequence[Mapping[str, float]]) -> AbstractContextManager[None]:
        """`with adapters.per_sample([{"a": 1.0}, {}]): ...`: each sample its own adapters (see
        `per_sample_adapters`)."""
        return per_sample_adapters(self.model, specs)

    def enable(self, names: str | Sequence[str] | None = None) -> None:
        current = [a.name for a in self.list() if a.active]
        extra = [a.name for a in self.list()] if names is None else ([names] if isinstance(names, str) else names)
        set_active_adapters(self.model, list(dict.fromkeys(current + list(extra))))

    def disable(self, names: str | Sequence[str] | None = None) -> None:
        off = None if names is None else ({names} if isinstance(names, str) else set(names))
        keep = [] if off is None else [a.name for a in self.list() if a.active and a.name not in off]
        set_active_adapters(self.model, keep)

    def list(self) -> list[AdapterInfo]:
        return list_adapters(self.model)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.list()]

    def _switch_mode(self, names: str | Sequence[str] | None, mode: str) -> None:
        state = get_state(self.model)
        attached = list(state.records) if state else []
        wanted = attached if names is None else ([names] if isinstance(names, str) else list(names))
        for name in wanted:
            if name not in attached:
                raise LoRAError(f"no adapter named '{name}' is attached; attached: {attached or 'none'}.")
            record = state.records[name]
            if record.mode == mode:
                continue
            apply_adapter(
                self.model, record.adapter, scale=record.scale, mode=mode, name=name,
                compute_dtype=record.compute_dtype if mode == "dynamic" else None,
            )

