"""zimage-lora: LoRA-family adapters for the Z-Image diffusion transformer."""

from .adapter import Adapter, Dora, Target, Unmatched
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

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "Dora",
    "Target",
    "Unmatched",
    "LoRAConfiguration",
    "load_adapter",
    "LoRAError",
    "AdapterNotFoundError",
    "AmbiguousSourceError",
    "DownloadError",
    "IncompatibleWeightsError",
    "InvalidFormatError",
    "UnsafeFileError",
    "UnsupportedError",
]
