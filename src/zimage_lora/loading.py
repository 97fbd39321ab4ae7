"""Source -> canonical `Adapter` resolved against a model: the one entry point the engine and the
tools use to read adapters."""

from __future__ import annotations

from pathlib import Path

import torch

from .adapter import Adapter
from .formats import read_adapter_file
from .keys import ModuleIndex, resolve
from .mlx.probe import index_of
from .sources import LoRAConfiguration, resolve_source


def load_adapter(
    source: str | Path | LoRAConfiguration,
    model: torch.nn.Module | ModuleIndex | None = None,
    *,
    name: str | None = None,
    filename: str | None = None,
    revision: str | None = None,
    strict: bool = False,
    check_finite: bool = True,
    allow_empty: bool = False,
) -> Adapter:
    """Read `source` and resolve it against `model` (a torch model, an MLX model, a `ModuleIndex`; default:
    the Z-Image-Turbo module inventory).

    Every tensor read is checked for NaN/Inf, once, here where it enters (the engine does not scan an
    adapter it loaded itself again); `check_finite=False` skips that scan.
    `allow_empty=True` returns an adapter without targets when no key matches (for reports) instead of
    raising `IncompatibleWeightsError`.
    """
    cfg = source if isinstance(source, LoRAConfiguration) else LoRAConfiguration(source)
    if filename is not None:
        cfg.filename = filename
    if revision is not None:
        cfg.revision = revision
    resolved = resolve_source(cfg)
    file = read_adapter_file(resolved.path, resolved.config)
    if isinstance(model, ModuleIndex):
        index = model
    elif (mlx := index_of(model)) is not None:  # an MLX model: its own tree under diffusers' names
        index = mlx
    else:
        if model is None:
            from .inventory import inventory_model

            model = inventory_model()
        index = ModuleIndex(model)
    return resolve(
        file, index, name=name or cfg.name or resolved.default_name, strict=strict, check_finite=check_finite,
        allow_empty=allow_empty,
    )
