"""zimage-lora: LoRA-family adapters for the Z-Image diffusion transformer."""

from .adapter import Adapter, Dora, Target, Unmatched
from .apply import (
    AdapterInfo,
    Adapters,
    ApplyReport,
    apply_adapter,
    list_adapters,
    per_sample_adapters,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)
from .batch import Request, generate_batch
from .errors import (
    AdapterNotFoundError,
    AmbiguousSourceError,
    DownloadError,
    IncompatibleWeightsError,
    InvalidFormatError,
    LoRAError,
    UnsafeFileError,
    UnsupportedError,
)
from .loading import load_adapter
from .sources import LoRAConfiguration
from .store import AdapterStore, StoreStats

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "Dora",
    "Target",
    "Unmatched",
    "LoRAConfiguration",
    "load_adapter",
    "apply_adapter",
    "remove_adapter",
    "set_adapter_scale",
    "list_adapters",
    "set_active_adapters",
    "per_sample_adapters",
    "Request",
    "generate_batch",
    "AdapterStore",
    "StoreStats",
    "Adapters",
    "ApplyReport",
    "AdapterInfo",
    "LoRAError",
    "AdapterNotFoundError",
    "AmbiguousSourceError",
    "DownloadError",
    "IncompatibleWeightsError",
    "InvalidFormatError",
    "UnsafeFileError",
    "UnsupportedError",
]
