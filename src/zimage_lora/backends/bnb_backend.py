"""bitsandbytes `Linear4bit` (nf4, fp4) and `Linear8bitLt`, as made by diffusers' `BitsAndBytesConfig`.

4-bit: the weight is packed nibbles plus a `QuantState` (per-block absmax, possibly itself quantized
when `compress_statistics`/double quantization is on). On CPUs with AVX512-BF16, bitsandbytes repacks
the weight for its kernel on the first eval-mode forward and rewrites the `QuantState` in place
(absmax to bf16, transposed, no longer nested). Dequantizing reads either layout; requantizing writes
the layout the layer has, keeping each block's stored absmax where the merged block fits it (`_requant`;
only when double-quantized statistics cannot hold a needed absmax are all blocks picked afresh, in the
standard layout, which the layer repacks on its next forward); snapshots deep-copy the
`QuantState`, because the repack mutates it, and restore hands out fresh copies every time.

8-bit (LLM.int8): int8 rows `CB` with per-row absmax `SCB`; after the first forward both move from the
parameter to `module.state`, aliasing the same tensors, so writes go in place into whichever holds them.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import bitsandbytes.functional as F
import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt

from ._requant import keep_stored

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
    dense: torch.Tensor = table[codes] * scales
    return dense


def _pack_cpu_layout(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of `_unpack_cpu_layout`: nibble codes (rows, cols) into the AVX512 CPU layout."""
    rows, cols = codes.shape
    half = _CPU_BLOCK_N
    tiles = codes.to(torch.uint8).reshape(rows // half, half, cols // 2, 2).transpose(1, 2).reshape(-1, 2 * half)
    return ((tiles[:, half:] << 4) | tiles[:, :half]).reshape(rows, cols // 2)


def _nearest_codes(v: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the table entry nearest to v / absmax for blocks v (nb, bs), absmax (nb, 1)."""
    order = torch.argsort(table)
    ordered = table[order]
    scaled = (v / absmax.clamp(min=1e-38)).clamp(-1, 1)
    return order[torch.bucketize(scaled, (ordered[1:] + ordered[:-1]) / 2)]


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= x (x >= 0)."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    return torch.where(low, (b.view(torch.int16) + 1).view(torch.bfloat16), b)


def _nested_round_up(need: torch.Tensor, state: Any) -> tuple[torch.Tensor, bool]:
    """Per block, the smallest absmax the double-quantized statistics can represent that is >= need
    (uint8 codes into state2's table, within each block's 256-block group), and whether some need was
    beyond its group's range (that block then gets the group's largest absmax and is clamped)."""
    s2 = state.state2
    table, order = torch.sort(s2.code.float())
    group = torch.arange(need.numel(), device=need.device) // s2.blocksize
    scale = s2.absmax.float()[group]
    top = table.numel() - 1
    idx = torch.searchsorted(table, (need - state.offset) / scale).clamp(max=top)
    idx = torch.where(table[idx] * scale + state.offset < need, idx + 1, idx)
    return order[idx.clamp(max=top)].to(torch.uint8), bool((idx > top).any())


def _blocks_keeping_scales(
    weight: torch.Tensor, state: Any, packed: bool
) -> tuple[torch.Tensor, Any, float | None] | None:
    """(nibble codes (rows, cols), new state, squared error or None) with each block's stored absmax kept
    where it decodes closer to the merged block than the smallest absmax that fits it does (`_requant`).
    The error is given when double-quantized statistics could not hold some needed absmax, so that the
    caller can compare with statistics picked afresh. None for shapes not made of whole blocks."""
    rows, cols = state.shape
    bs = state.blocksize
    if (rows * cols) % bs:
        return None
    v = weight.reshape(-1, bs).float()
    need = v.abs().amax(dim=1)
    overflow = False
    table = state.code.float().to(v.device)
    new_state = copy.deepcopy(state)
    if packed:  # absmax bf16, stored (cols / bs, rows)
        stored_raw = state.absmax.T.reshape(-1)
        fresh_raw = _round_up_bf16(need)
        stored, fresh = stored_raw.float(), fresh_raw.float()
    elif state.nested:
        stored = F.dequantize_blockwise(state.absmax, state.state2).float() + state.offset
        fresh_raw, overflow = _nested_round_up(need, state)
        stored_raw = state.absmax
        fresh = F.dequantize_blockwise(fresh_raw, state.state2).float() + state.offset
    else:
        stored_raw, fresh_raw = state.absmax, need.to(state.absmax.dtype)
        stored, fresh = stored_raw.float(), fresh_raw.float()
    q_stored = _nearest_codes(v, stored[:, None], table)
    q_fresh = _nearest_codes(v, fresh[:, None], table)
    kept = keep_stored(v, table[q_stored] * stored[:, None], table[q_fresh] * fresh[:, None])
    codes = torch.where(kept[:, None], q_stored, q_fresh).reshape(rows, cols)
    absmax = torch.where(kept, stored_raw, fresh_raw)
    new_state.absmax = absmax.reshape(rows, cols // bs).T.contiguous() if packed else absmax
    err = None
    if overflow:
        scales = torch.where(kept, stored, fresh)[:, None]
        err = float((table[codes.reshape(v.shape)] * scales - v).square().sum())
    return codes, new_state, err


def _fresh(module: torch.nn.Module, weight: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """Every block's scale picked afresh by bitsandbytes, in the standard layout."""
    packed = getattr(state, "packing_format_for_cpu", False)
    dtype = state.original_dtype if packed else state.dtype
    nested = state.original_nested if packed else state.nested
    storage = getattr(state, "original_storage_type", None) if packed else module.weight.data.dtype
    return F.quantize_4bit(
        weight.to(dtype=dtype),
        blocksize=state.blocksize,
        compress_statistics=nested,
        quant_type=state.quant_type,
        quant_storage=storage or torch.uint8,
    )


def _squared_error(data: torch.Tensor, state: Any, weight: torch.Tensor) -> float:
    return float((F.dequantize_4bit(data, state).float() - weight.float()).square().sum())


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
        data = cast(torch.Tensor, module.weight).data
        if getattr(state, "packing_format_for_cpu", False):
            return _dequantize_cpu_layout(data, state)
        return F.dequantize_4bit(data, state).float()

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        state = _quant_state(module)
        packed = getattr(state, "packing_format_for_cpu", False)
        stored = cast(torch.Tensor, module.weight).data  # Params4bit: the packed codes
        weight = weight.reshape(state.shape).to(stored.device)
        kept = _blocks_keeping_scales(weight, state, packed)
        if kept is not None:
            codes, new_state, err = kept
            if packed:  # written in the layout the kernel already uses: no repack on the next forward
                data = _pack_cpu_layout(codes)
            else:
                flat = codes.reshape(-1).to(torch.uint8)
                data = ((flat[::2] << 4) | flat[1::2]).view(stored.dtype).unsqueeze(1)
            if err is None or err <= _squared_error(*_fresh(module, weight, state), weight):
                self._put(module, data.reshape(stored.shape), new_state)
                return
        self._put(module, *_fresh(module, weight, state))

    def snapshot(self, module: torch.nn.Module) -> Any:
        return (cast(torch.Tensor, module.weight).data.clone(), copy.deepcopy(_quant_state(module)))

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        data, quant_state = state
        self._put(module, data.clone(), copy.deepcopy(quant_state))

    @staticmethod
    def _put(module: torch.nn.Module, data: torch.Tensor, quant_state: Any) -> None:
        weight: Any = module.weight  # Params4bit, which carries its quant_state
        weight.data = data
        weight.quant_state = quant_state
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = quant_state


def _int8_parts(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    weight: Any = module.weight  # Int8Params, which may carry SCB
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else cast(Any, module).state.SCB
    return weight.data, scb


class BnB8bitBackend:
    name = "bitsandbytes-8bit"
    supports_merge = True

    def matches(self, module: torch.nn.Module) -> bool:
        if not isinstance(module, Linear8bitLt) or module.weight.dtype != torch.int8:
            return False
        return getattr(module.weight, "SCB", None) is not None or module.state.SCB is not None

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        w = cast(torch.Tensor, module.weight)
        return (w.shape[0], w.shape[1])

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        cb, scb = _int8_parts(module)
        dense: torch.Tensor = F.int8_vectorwise_dequant(cb, scb).float()
        return dense

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
