"""Reading adapter files into grouped, not yet resolved, form.

The names below are imported on first use (PEP 562): the trainer modules read `formats.untrusted`
while the reader's own import chain (grammar -> layouts -> trainers) is still running, so importing
a submodule of this package must not import the reader."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .reader import AdapterFile, Group, read_adapter_file
    from .safetensors_file import Header, TensorInfo, read_header

_HOMES = {"AdapterFile": "reader", "Group": "reader", "read_adapter_file": "reader",
          "Header": "safetensors_file", "TensorInfo": "safetensors_file", "read_header": "safetensors_file"}

__all__ = ["AdapterFile", "Group", "read_adapter_file", "Header", "TensorInfo", "read_header"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
