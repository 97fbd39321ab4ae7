"""Applying adapters to a model: merged into the weights (exact restore) or dynamic (wrapped layers)."""

from .engine import apply_adapter, list_adapters, remove_adapter, set_adapter_scale
from .layer import AdapterLinear
from .report import AdapterInfo, ApplyReport

__all__ = [
    "apply_adapter",
    "remove_adapter",
    "set_adapter_scale",
    "list_adapters",
    "ApplyReport",
    "AdapterInfo",
    "AdapterLinear",
]
