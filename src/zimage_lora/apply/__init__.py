"""Applying adapters to a model: merged into the weights (exact restore) or dynamic (wrapped layers)."""

from .engine import apply_adapter, list_adapters, remove_adapter, set_active_adapters, set_adapter_scale
from .handle import Adapters
from .layer import AdapterLinear
from .per_sample import per_sample_adapters
from .report import AdapterInfo, ApplyReport

__all__ = [
    "apply_adapter",
    "remove_adapter",
    "set_adapter_scale",
    "list_adapters",
    "set_active_adapters",
    "Adapters",
    "ApplyReport",
    "AdapterInfo",
    "AdapterLinear",
    "per_sample_adapters",
]
