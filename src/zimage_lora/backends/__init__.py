"""Backends for base layers. Quantized backends are imported only when their package is loaded."""

from __future__ import annotations

import importlib
import sys
import warnings

import torch

from ..errors import UnsupportedError
from .base import Backend
from .plain import PlainLinearBackend

# (module path, class name, top-level package that must already be imported for it to apply).
# A quantized layer can only exist if its package was imported, so checking sys.modules keeps
# start-up free of optional imports.
REGISTRY: list[tuple[str, str, str]] = [
    (".torchao_backend", "TorchAOBackend", "torchao"),
    (".bnb_backend", "BnB4bitBackend", "bitsandbytes"),
    (".bnb_backend", "BnB8bitBackend", "bitsandbytes"),
    (".gguf_backend", "GGUFBackend", "gguf"),
    (".gguf_backend", "GGUFReadOnlyBackend", "gguf"),
]

_PLAIN = PlainLinearBackend()
_loaded: dict[str, Backend | None] = {}


def _candidates() -> list[Backend]:
    found: list[Backend] = []
    for path, cls, package in REGISTRY:
        if package not in sys.modules:
            continue
        key = f"{path}:{cls}"
        if key not in _loaded:
            # diffusers imports every quantization package it finds; a version of one that this
            # backend cannot work with must not break plain models, so it is skipped with a warning.
            try:
                _loaded[key] = getattr(importlib.import_module(path, __name__), cls)()
            except (ImportError, AttributeError) as exc:
                warnings.warn(
                    f"zimage_lora: {package} backend unavailable ({exc}); its layers are not supported", stacklevel=3
                )
                _loaded[key] = None
        backend = _loaded[key]
        if backend is not None:
            found.append(backend)
    return found


def backend_for(module: torch.nn.Module) -> Backend:
    for backend in _candidates():
        if backend.matches(module):
            return backend
    if _PLAIN.matches(module):
        return _PLAIN
    raise UnsupportedError(
        f"no backend handles layers of type {type(module).__name__}; supported: plain Linear"
        + "".join(f", {cls}" for _p, cls, _k in REGISTRY)
    )


__all__ = ["Backend", "PlainLinearBackend", "REGISTRY", "backend_for"]
