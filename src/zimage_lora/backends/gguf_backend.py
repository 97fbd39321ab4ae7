"""GGUF weights loaded by diffusers (`GGUFLinear` holding a `GGUFParameter` of raw block bytes).

Z-Image GGUF files store attention as one fused qkv tensor; diffusers splits it into to_q/to_k/to_v
by rows, so those three weights may be views of one buffer. Every write here goes in place, so each
layer only ever touches its own rows and views stay views.

Dequantizing uses diffusers' own block decoders (what `GGUFLinear` computes with), upcast to fp32.
Requantizing needs an encoder: the `gguf` package has them for the legacy block formats and BF16, not
for K-quants or i-quants, so those layers are handled by `GGUFReadOnlyBackend` (`supports_merge`
False): dynamic mode works on them, merged mode raises an error that points to dynamic mode.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import torch
from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter, dequantize_gguf_tensor

from ..errors import UnsupportedError

Q = gguf.GGMLQuantizationType
#: Formats the gguf package can encode, so a merged weight can be written back in the same format.
WRITABLE = frozenset({Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16})


def _qtype(module: torch.nn.Module) -> Q | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, GGUFParameter) or weight.quant_type is None:
        return None
    return Q(weight.quant_type)


def _raw(module: torch.nn.Module) -> torch.Tensor:
    """The weight's bytes as a plain tensor sharing its storage."""
    return module.weight.as_tensor().detach()


def _shape(module: torch.nn.Module) -> tuple[int, int]:
    rows, cols = module.weight.quant_shape
    return (int(rows), int(cols))


def _dequantize(module: torch.nn.Module) -> torch.Tensor:
    return dequantize_gguf_tensor(module.weight).float().reshape(_shape(module))


def _snapshot(module: torch.nn.Module) -> torch.Tensor:
    return _raw(module).clone()


def _restore(module: torch.nn.Module, state: torch.Tensor) -> None:
    with torch.no_grad():
        _raw(module).copy_(state)


class GGUFBackend:
    """GGUF layers in a format the gguf package can encode: merge requantizes in that same format."""

    name = "gguf"
    supports_merge = True

    def matches(self, module: torch.nn.Module) -> bool:
        return _qtype(module) in WRITABLE

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        return _shape(module)

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        return _dequantize(module)

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        raw = _raw(module)
        dense = weight.detach().reshape(_shape(module)).to("cpu", torch.float32).numpy()
        encoded = np.ascontiguousarray(gguf.quants.quantize(dense, _qtype(module)))
        new = torch.from_numpy(encoded).view(raw.dtype).reshape(raw.shape)
        with torch.no_grad():
            raw.copy_(new)

    def snapshot(self, module: torch.nn.Module) -> Any:
        return _snapshot(module)

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        _restore(module, state)


class GGUFReadOnlyBackend:
    """GGUF layers with no encoder (K-quants, i-quants): dynamic mode only."""

    name = "gguf-readonly"
    supports_merge = False

    def matches(self, module: torch.nn.Module) -> bool:
        qtype = _qtype(module)
        return qtype is not None and qtype not in WRITABLE and qtype in SUPPORTED_GGUF_QUANT_TYPES

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        return _shape(module)

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        return _dequantize(module)

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        qtype = _qtype(module)
        raise UnsupportedError(
            f"cannot merge into a GGUF {qtype.name if qtype is not None else '?'} layer: the gguf package has no "
            f"encoder for this format (writable: {', '.join(sorted(q.name for q in WRITABLE))}). "
            "Apply the adapter with mode='dynamic' instead."
        )

    def snapshot(self, module: torch.nn.Module) -> Any:
        return _snapshot(module)

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        _restore(module, state)
