"""The MLX backend: the public API on an `mlx.nn.Module` (mflux's Z-Image transformer, or any MLX model
whose module tree uses Z-Image's names). Install with the `[mlx]` extra.

`is_mlx` is the one test the public functions make; it never imports MLX (a model can only be an MLX
module when `mlx.nn` is already imported), so the PyTorch path pays nothing for this package.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any


def is_mlx(obj: Any) -> bool:
    nn = sys.modules.get("mlx.nn")
    return nn is not None and isinstance(obj, nn.Module)


def dispatcher(obj: Any) -> ModuleType | None:
    """The MLX engine (`mlx.api`: apply, remove, set_scale, set_active, switch_mode, list_all) for an MLX
    model, else None."""
    if not is_mlx(obj):
        return None
    from . import api

    return api
