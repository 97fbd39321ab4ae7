"""GGUF weights loaded by diffusers (`GGUFLinear` holding a `GGUFParameter` of raw block bytes).

Z-Image GGUF files store attention as one fused qkv tensor; diffusers splits it into to_q/to_k/to_v
by rows, so those three weights may be views of one buffer. Every write here goes in place, so each
layer only ever touches its own rows and views stay views.

Dequantizing uses diffusers' own block decoders (what `GGUFLinear` computes with), upcast to fp32.
Requantizing needs an encoder: the `gguf` package has them for the legacy block formats and BF16, not
for K-quants or i-quants, so those layers are handled by `GGUFReadOnlyBackend` (`supports_merge`
False): dynamic mode works on them, merged mode raises an error that points to dynamic mode.
Block formats keep each block's stored d (and m) where the merged block still fits them, so the base
is not rounded a second time (`_requant`).
"""

from __future__ import annotations

from typing import Any, cast

import gguf
import numpy as np
import torch
from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter, dequantize_gguf_tensor

from ..errors import UnsupportedError
from ._requant import keep_stored, uniform_codes

Q = gguf.GGMLQuantizationType
#: Formats the gguf package can encode, so a merged weight can be written back in the same format.
WRITABLE = frozenset({Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16})


# Block formats requantized with their stored scales where those still fit:
# qtype -> (header bytes: d[, m] as fp16, has a min m, bits per code, code offset, code range).
_BLOCKS: dict[Q, tuple[int, bool, int, int, int, int]] = {
    Q.Q4_0: (2, False, 4, 8, 0, 15),
    Q.Q4_1: (4, True, 4, 0, 0, 15),
    Q.Q5_0: (2, False, 5, 16, 0, 31),
    Q.Q5_1: (4, True, 5, 0, 0, 31),
    Q.Q8_0: (2, False, 8, 0, -127, 127),
}


def _pack(header: np.ndarray, q: np.ndarray, bits: int) -> np.ndarray:
    """Block bytes from each block's header bytes and its 32 codes, in ggml's layout."""
    if bits == 8:
        return np.concatenate([header, q.astype(np.int8).view(np.uint8)], axis=1)
    q = q.astype(np.uint8)
    qs = (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)  # element j and j+16 share a byte
    parts = [header]
    if bits == 5:
        parts.append(np.packbits((q >> 4).reshape(-1, 1, 32), axis=-1, bitorder="little").reshape(-1, 4))
    return np.concatenate([*parts, qs], axis=1)


def _encode_keeping_scales(dense: np.ndarray, old: np.ndarray, qtype: Q) -> np.ndarray:
    """`dense` (rows, cols) encoded in `qtype`: each block keeps its stored d (and m) where they fit the
    merged values and decode closer than freshly picked ones (see `_requant`). `old`: the stored bytes."""
    fresh = gguf.quants.quantize(dense, qtype)
    if qtype not in _BLOCKS:
        return fresh
    hdr, has_min, bits, off, lo, hi = _BLOCKS[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    stored = old.reshape(-1, size)
    v = torch.from_numpy(np.ascontiguousarray(dense.reshape(-1, block), dtype=np.float32))
    header = stored[:, :hdr]
    d = torch.from_numpy(header[:, :2].copy().view(np.float16).astype(np.float32))
    m = torch.from_numpy(header[:, 2:4].copy().view(np.float16).astype(np.float32)) if has_min else 0.0
    q = uniform_codes(v, d, m, lo - off, hi - off)
    kept = keep_stored(v, q * d + m, torch.from_numpy(gguf.quants.dequantize(fresh, qtype).reshape(v.shape)))
    out = fresh.reshape(-1, size).copy()
    mask = kept.numpy()
    out[mask] = _pack(header[mask], (q[kept] + off).numpy(), bits)
    packed: np.ndarray = out.reshape(fresh.shape)
    return packed


def _qtype(module: torch.nn.Module) -> Q | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, GGUFParameter):
        return None
    quant_type = weight.quant_type  # type: ignore[attr-defined]  # diffusers sets it in __new__, undeclared
    return None if quant_type is None else Q(quant_type)


def _raw(module: torch.nn.Module) -> torch.Tensor:
    """The weight's bytes as a plain tensor sharing its storage."""
    raw: torch.Tensor = cast(Any, module.weight).as_tensor().detach()  # a GGUFParameter
    return raw


def _shape(module: torch.nn.Module) -> tuple[int, int]:
    rows, cols = cast(Any, module.weight).quant_shape  # a GGUFParameter
    return (int(rows), int(cols))


def _dequantize(module: torch.nn.Module) -> torch.Tensor:
    dense: torch.Tensor = dequantize_gguf_tensor(module.weight)  # type: ignore[no-untyped-call]  # unannotated in diffusers
    return dense.float().reshape(_shape(module))


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
        stored = raw.detach().cpu().contiguous().view(torch.uint8).numpy()
        qtype = _qtype(module)
        assert qtype is not None  # `matches` found a writable quant type
        encoded = np.ascontiguousarray(_encode_keeping_scales(dense, stored, qtype))
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
