"""An object-style handle over the engine's functions, shaped like diffusers' adapter methods."""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter import Adapter
from ..sources import LoRAConfiguration
from .components import components_of, is_pipeline
from .engine import (
    _model_of,
    apply_adapter,
    list_adapters,
    remove_adapters,
    set_active_adapters,
    set_adapter_scale,
    switch_mode,
)
from .per_sample import per_sample_adapters
from .report import AdapterInfo, ApplyReport
from .validate import check_names


class Adapters:
    """`Adapters(model)`: load, switch, re-weight, fuse and unload adapters on one model.

    It keeps no state of its own (everything lives on the model), so several handles on the same
    model agree, and the module-level functions can be mixed with it freely.

    `fuse` / `unfuse` change how an adapter runs (merged into the weights, or dynamic), never whether
    or how strongly: each keeps its scale, and a disabled adapter stays disabled. Fusing a disabled
    adapter changes no weight; enabling it later merges it at its scale.
    """

    def __init__(self, model: Any) -> None:
        # A pipeline with a text encoder stays a pipeline: every call then covers both components.
        self.model: nn.Module = model if is_pipeline(components_of(model)) else _model_of(model)

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
        names = check_names(names)
        if weights is not None and (isinstance(weights, str) or not isinstance(weights, Sequence)):
            weights = [weights] * len(names)  # one value for all; checked as a number with the others
        set_active_adapters(self.model, names, weights)

    def set_scale(self, name: str, scale: float) -> None:
        set_adapter_scale(self.model, name, scale)

    def fuse(self, names: str | Sequence[str] | None = None) -> None:
        """Merge dynamic adapters into the weights (exactly restorable with `unfuse` or `unload`), at their
        current scale; disabled ones stay disabled (see the class doc). All or nothing."""
        switch_mode(self.model, names, "merged")

    def unfuse(self, names: str | Sequence[str] | None = None) -> None:
        """Take merged adapters back out of the weights (from the kept originals) and run them dynamic."""
        switch_mode(self.model, names, "dynamic")

    def unload(self, names: str | Sequence[str] | None = None) -> None:
        """Remove `names` (None: all), all or none."""
        remove_adapters(self.model, None if names is None else check_names(names))

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
        extra = [a.name for a in self.list()] if names is None else check_names(names)
        set_active_adapters(self.model, list(dict.fromkeys(current + extra)))

    def disable(self, names: str | Sequence[str] | None = None) -> None:
        off = None if names is None else set(check_names(names))
        keep = [] if off is None else [a.name for a in self.list() if a.active and a.name not in off]
        set_active_adapters(self.model, keep)

    def list(self) -> list[AdapterInfo]:
        return list_adapters(self.model)

    @property
    def names(self) -> builtins.list[str]:  # `list` here is the method above
        return [a.name for a in self.list()]

    def __repr__(self) -> str:
        """`Adapters(ZImageTransformer2DModel: 2 attached; style (dynamic, x0.8, active), ...)`."""
        infos = self.list()
        rows = [f"{a.name} ({a.mode}, x{a.scale:g}, {'active' if a.active else 'inactive'})" for a in infos]
        body = f"{len(infos)} attached: " + ", ".join(rows) if rows else "no adapters"
        return f"Adapters({type(self.model).__name__}: {body})"
