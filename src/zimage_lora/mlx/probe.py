"""What the rest of the library asks about MLX models without importing the MLX engine (`mlx.api`, which
imports the engine's checks): is this an MLX model, its key index, and the refusals of what the MLX
backend does not do. Never imports MLX itself (a model can only be an MLX module when `mlx.nn` is
already imported), so the PyTorch path pays nothing for it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError

if TYPE_CHECKING:
    from ..keys import ModuleIndex

#: What the MLX backend refuses, and why (the message of each `UnsupportedError`; one home per reason).
UNSUPPORTED = {
    "per_sample_adapters": "mflux's Z-Image transformer runs one sample per call (no batch to route), and the "
    "MLX layers have no per-sample routing. Run each sample with its own set_active_adapters(model, names, "
    "weights) before its call.",
    "regional_adapters": "masks are routed onto the token rows of diffusers' Z-Image forward, which the MLX "
    "layers do not see. Use the PyTorch model for regional adapters.",
    "AdapterStore": "the store serves adapters through per-sample blocks, which the MLX backend does not have. "
    "Use apply_adapter / set_active_adapters on the MLX model.",
    "generate_batch": "it batches diffusers pipeline calls with per-sample adapters, which the MLX backend does "
    "not have. Call mflux's generate_image once per request.",
}


def is_mlx(obj: Any) -> bool:
    nn = sys.modules.get("mlx.nn")
    return nn is not None and isinstance(obj, nn.Module)


def index_of(obj: Any) -> ModuleIndex | None:
    """The key index over an MLX model's own module tree (its transformer's, for mflux's `ZImage`), under
    diffusers' names; None for anything else. What `load_adapter(source, model)` resolves keys against."""
    if not is_mlx(obj):
        return None
    from .tree import Tree, transformer_of

    return Tree(transformer_of(obj)).index


def refuse(obj: Any, feature: str) -> None:
    """Raise `UnsupportedError` naming `feature` and why (`UNSUPPORTED`) when `obj` is an MLX model, or a
    pipeline holding one as its `transformer`."""
    if is_mlx(obj) or is_mlx(getattr(obj, "transformer", None)):
        raise unsupported(feature)


def unsupported(feature: str) -> UnsupportedError:
    return UnsupportedError(f"{feature} is not supported on MLX models: {UNSUPPORTED[feature]}")
