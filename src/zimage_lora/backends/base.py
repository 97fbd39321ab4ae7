"""The plug-in interface for base layers (plain and quantized Linear).

One small object per backend, found by `backends.backend_for(module)`, imported lazily so that an
optional quantization package is only imported when a model actually uses it. A new backend is one
file: implement `Backend` and add its module path to `backends.REGISTRY`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    """How the engine reads and writes the weight of one kind of Linear layer."""

    name: str
    #: True when `set_base_weight` can write a merged weight back in the layer's own format.
    supports_merge: bool

    def matches(self, module: torch.nn.Module) -> bool:
        """Whether this backend handles `module` (checked in registry order; the plain backend is last)."""
        ...

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        """(out_features, in_features) of the logical weight."""
        ...

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        """The weight as a dense tensor (dequantized for quantized layers), shape (out, in), fp32."""
        ...

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        """Write a dense fp32 weight back, rounded/requantized once into the layer's own format.

        Raises `UnsupportedError` when the format cannot be written (then `supports_merge` is False).
        """
        ...

    def snapshot(self, module: torch.nn.Module) -> Any:
        """Everything needed to put the exact original storage back (tensors cloned, state kept)."""
        ...

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        """Put back what `snapshot` returned, bit for bit."""
        ...
