"""bitsandbytes `Linear4bit` (nf4, fp4) and `Linear8bitLt`, as made by diffusers' `BitsAndBytesConfig`.

4-bit: the weight is packed nibbles plus a `QuantState` (per-block absmax, possibly itself quantized
when `compress_statistics`/double quantization is on). On CPUs with AVX512-BF16, bitsandbytes repacks
the weight for its kernel on the first eval-mode forward and rewrites the `QuantState` in place
(absmax to bf16, transposed, no longer nested). Dequantizing reads either layout; requantizing always
writes the standard layout (the layer repacks it again on its next forward); snapshots deep-copy the
`QuantState`, because the repack mutates it, and restore hands out fresh copies every time.

8-bit (LLM.int8): int8 rows `CB` with per-row absmax `SCB`; after the first forward both move from the
parameter to `module.state`, aliasing the same tensors, so writes go in place into whichever holds them.
"""

from __future__ import annotations

import copy
from typing import Any

import bitsandbytes.functional as F
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

# The CPU kernel's layout groups 32 output rows; each byte holds one nibble of two of those rows.
_CPU_BLOCK_N = 32


def _quant_state(module: torch.nn.Module) -> Any:
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def _unpack_cpu_layout(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Nibble codes (rows, cols) from bitsandbytes' AVX512 CPU layout."""
    half = _CPU_BLOCK_N
    groups = packed.reshape(-1, half)
    pairs = torch.cat([groups & 0xF, groups >> 4], dim=-1)  # the 64 codes of one tile, in tile order
    tiles = pairs.reshape(rows // half, cols // 2, half, 2)
    return tiles.transpose(1, 2).reshape(rows, cols).long()


def _dequantize_cpu_layout(data: torch.Tensor, state: Any) -> torch.Tensor:
    rows, cols = state.shape
    codes = _unpack_cpu_layout(data, rows, cols)
    table = state.code.to(torch.float32)
    absmax = state.absmax.float().T  # stored (cols/blocksize, rows); back to one value per block of a row
    scales = absmax.repeat_interleave(state.blocksize, dim=1)
    return table[codes] * scales


class BnB4bitBackend:
    name = "bitsandbytes-4bit"
    supports_merge = True

    def matches(self, module: torch.nn.Module) -> bool:
        return isinstance(module, Linear4bit) and _quant_state(module) is not None

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        rows, cols = _quant_state(module).shape
        return (int(rows), int(cols))

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        state = _quant_state(module)
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_cpu_layout(module.weight.data, state)
        return F.dequantize_4bit(module.weight.data, state).float()

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        state = _quant_state(module)
        packed = getattr(state, "packing_format_for_cpu", False)
        dtype = state.original_dtype if packed else state.dtype
        nested = state.original_nested if packed else state.nested
        storage = getattr(state, "original_storage_type", None) if packed else module.weight.data.dtype
        data, new_state = F.quantize_4bit(
            weight.reshape(state.shape).to(device=module.weight.device, dtype=dtype),
            blocksize=state.blocksize,
            compress_statistics=nested,
            quant_type=state.quant_type,
            quant_storage=storage or torch.uint8,
        )
        self._put(module, data, new_state)

    def snapshot(self, module: torch.nn.Module) -> Any:
        return (module.weight.data.clone(), copy.deepcopy(_quant_state(module)))

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        data, quant_state = state
        self._put(module, data.clone(), copy.deepcopy(quant_state))

    @staticmethod
    def _put(module: torch.nn.Module, data: torch.Tensor, quant_state: Any) -> None:
        module.weight.data = data
        module.weight.quant_state = quant_state
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = quant_state


def _int8_parts(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight = module.weight
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return weight.data, scb


class BnB8bitBackend:
    name = "bitsandbytes-8bit"
    supports_merge = True

    def matches(self, module: torch.nn.Module) -> bool:
        if not isinstance(module, Linear8bitLt) or module.weight.dtype != torch.int8:
            return False
        return getattr(module.weight, "SCB", None) is not None or module.state.SCB is not None

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        return (module.weight.shape[0], module.weight.shape[1])

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        cb, scb = _int8_parts(module)
        return F.int8_vectorwise_dequant(cb, scb).float()

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        cb, scb = _int8_parts(module)
        # bitsandbytes quantizes from fp16 when a layer is loaded; do the same for the same result.
        new_cb, new_scb, _ = F.int8_vectorwise_quant(weight.reshape(cb.shape).to(cb.device, torch.float16))
        with torch.no_grad():
            cb.copy_(new_cb)
            scb.copy_(new_scb)

    def snapshot(self, module: torch.nn.Module) -> Any:
        cb, scb = _int8_parts(module)
        return (cb.clone(), scb.clone())

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        cb, scb = _int8_parts(module)
        with torch.no_grad():
            cb.copy_(state[0])
            scb.copy_(state[1])
