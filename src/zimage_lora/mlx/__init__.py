"""The MLX backend: the public API on an `mlx.nn.Module` (mflux's Z-Image transformer, or any MLX model
whose module tree uses Z-Image's names). Install with the `[mlx]` extra.

`dispatcher` is the one test the public functions make (`probe.is_mlx`); neither imports MLX, so the
PyTorch path pays nothing for this package.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from .probe import is_mlx

__all__ = ["dispatcher", "is_mlx"]


def dispatcher(obj: Any) -> ModuleType | None:
    """The MLX engine (`mlx.api`: apply, remove, set_scale, set_active, switch_mode, list_all) for an MLX
    model, else None."""
    if not is_mlx(obj):
        return None
    from . import api

    return api
