"""zimage-lora: LoRA-family adapters for the Z-Image diffusion transformer.

The public names are imported on first use (PEP 562), so `import zimage_lora.cli` and
`zimage-lora --help` do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Adapter": ".adapter",
    "Dora": ".adapter",
    "Target": ".adapter",
    "Provenance": ".adapter",
    "Unmatched": ".adapter",
    "LoRAConfiguration": ".sources",
    "load_adapter": ".loading",
    "apply_adapter": ".apply",
    "remove_adapter": ".apply",
    "set_adapter_scale": ".apply",
    "list_adapters": ".apply",
    "set_active_adapters": ".apply",
    "per_sample_adapters": ".apply",
    "schedule": ".scheduling",
    "regional_adapters": ".apply.regional",
    "Request": ".batch",
    "generate_batch": ".batch",
    "AdapterStore": ".store",
    "combine": ".arithmetic",
    "resize": ".arithmetic",
    "extract": ".arithmetic",
    "StoreStats": ".store",
    "Adapters": ".apply",
    "ApplyReport": ".apply",
    "AdapterInfo": ".apply",
    "LoRAError": ".errors",
    "AdapterNotFoundError": ".errors",
    "AmbiguousSourceError": ".errors",
    "DownloadError": ".errors",
    "IncompatibleWeightsError": ".errors",
    "InvalidArgumentError": ".errors",
    "InvalidFormatError": ".errors",
    "UnsafeFileError": ".errors",
    "UnsupportedError": ".errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'zimage_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

