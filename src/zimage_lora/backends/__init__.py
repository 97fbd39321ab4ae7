"""Backends for base layers. Quantized backends are imported only when their package is loaded."""

from __future__ import annotations

import importlib
import warnings

import torch

from ..errors import UnsupportedError
from .base import Backend
from .plain import PlainLinearBackend

# (module path, class name, where the layer's classes come from). A backend module imports its
# quantization package, so it is imported only when a layer's own class or its weight's class comes
# from that package: a plain model never imports torchao, bitsandbytes or gguf (nor their log lines).
REGISTRY: list[tuple[str, str, tuple[str, ...]]] = [
    (".torchao_backend", "TorchAOBackend", ("torchao",)),
    (".bnb_backend", "BnB4bitBackend", ("bitsandbytes",)),
    (".bnb_backend", "BnB8bitBackend", ("bitsandbytes",)),
    (".gguf_backend", "GGUFBackend", ("diffusers.quantizers.gguf", "gguf")),
    (".gguf_backend", "GGUFReadOnlyBackend", ("diffusers.quantizers.gguf", "gguf")),
]

_PLAIN = PlainLinearBackend()
_loaded: dict[str, Backend | None] = {}


def _origins(module: torch.nn.Module) -> set[str]:
    """Top modules (e.g. 'torchao.quantization') of the classes of a layer and of its weight."""
    classes = list(type(module).__mro__)
    weight = getattr(module, "weight", None)
    if weight is not None:
        classes.extend(type(weight).__mro__)
    return {c.__module__ for c in classes}


def _candidates(module: torch.nn.Module) -> list[Backend]:
    origins = _origins(module)
    found: list[Backend] = []
    for path, cls, packages in REGISTRY:
        if not any(o == p or o.startswith(p + ".") for o in origins for p in packages):
            continue
        key = f"{path}:{cls}"
        if key not in _loaded:
            # a version of a quantization package that this backend cannot work with must not
            # break plain layers, so it is skipped with a warning.
            try:
                _loaded[key] = getattr(importlib.import_module(path, __name__), cls)()
            except (ImportError, AttributeError) as exc:
                warnings.warn(
                    f"zimage_lora: {packages[0]} backend unavailable ({exc}); its layers are not supported",
                    stacklevel=3,
                )
                _loaded[key] = None
        backend = _loaded[key]
        if backend is not None:
            found.append(backend)
    return found


def backend_for(module: torch.nn.Module) -> Backend:
    for backend in _candidates(module):
        if backend.matches(module):
            return backend
    if _PLAIN.matches(module):
        return _PLAIN
    raise UnsupportedError(
        f"no backend handles layers of type {type(module).__name__}; supported: plain Linear"
        + "".join(f", {cls}" for _p, cls, _k in REGISTRY)
    )


__all__ = ["Backend", "PlainLinearBackend", "REGISTRY", "backend_for"]
