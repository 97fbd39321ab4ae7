"""Reading and writing an MLX `QuantizedLinear`'s weight: decode, and requantize a merged weight into
the same bits, group size and mode, keeping each group's stored scale where that decodes closer.

A quantizer run from scratch on W + dW picks new scales for every group and rounds the base weight a
second time onto a grid it was not on; a small delta drowns in that rounding. So each group is encoded
twice, on its stored grid (the stored scale and bias, every code's value decoded by `mx.dequantize`
itself, so every mode MLX offers is handled the same way) and by `mx.quantize` from scratch, and the
one that decodes closer to W + dW is kept (the rule of `backends/_requant.py` for the PyTorch formats).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import torch
from mlx import nn

from .tree import to_torch

#: Stored-grid encoding packs codes itself: widths that fill a 32-bit word exactly.
PACKED_BITS = (1, 2, 4, 8)
_ROWS_ELEMENTS = 1 << 22  # rows per block so that a block's code table stays a few tens of MiB


@dataclass(frozen=True)
class Spec:
    group_size: int
    bits: int
    mode: str

    @classmethod
    def of(cls, module: nn.Module) -> Spec:
        """The format of a `QuantizedLinear` (given as any module: a layer's kept original)."""
        return cls(int(getattr(module, "group_size")), int(getattr(module, "bits")),  # noqa: B009
                   str(getattr(module, "mode", "affine")))


def stored(module: nn.QuantizedLinear) -> dict[str, mx.array]:
    """The arrays that hold the quantized weight (never the bias)."""
    out = {"weight": module["weight"], "scales": module["scales"]}
    if module.get("biases") is not None:
        out["biases"] = module["biases"]
    return out


def decode(arrays: dict[str, mx.array], spec: Spec) -> mx.array:
    return mx.dequantize(arrays["weight"], arrays["scales"], arrays.get("biases"), spec.group_size, spec.bits,
                         mode=spec.mode)


def dense(module: nn.QuantizedLinear) -> torch.Tensor:
    """The weight the layer computes with, fp32 (out, in)."""
    return to_torch(decode(stored(module), Spec.of(module)))


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (rows, n) into uint32 words, the first code in the lowest bits (MLX's order)."""
    per = 32 // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None, :]
    words: np.ndarray = np.bitwise_or.reduce(c << shifts, axis=2).astype(np.uint32)
    return words


def _code_values(arrays: dict[str, mx.array], spec: Spec, rows: int, cols: int) -> torch.Tensor:
    """(rows, groups, 2**bits): what each code decodes to in each group, with the stored scale and bias."""
    n_codes, gs = 1 << spec.bits, spec.group_size
    groups = cols // gs
    table = torch.empty(rows, groups, n_codes)
    j = np.arange(cols) % gs
    for first in range(0, n_codes, gs):
        codes = (first + j) % n_codes
        words = mx.array(pack(np.broadcast_to(codes, (rows, cols)), spec.bits))
        values = to_torch(decode({**arrays, "weight": words}, spec)).reshape(rows, groups, gs)
        take = min(gs, n_codes - first)
        table[:, :, first : first + take] = values[:, :, :take]
    return table


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per element of values (rows, groups, gs), the code whose table value (rows, groups, C) is nearest."""
    order = table.argsort(dim=-1)
    srt = table.gather(-1, order)
    i = torch.searchsorted(srt.contiguous(), values.contiguous()).clamp(1, srt.shape[-1] - 1)
    lo, hi = srt.gather(-1, i - 1), srt.gather(-1, i)
    pick = torch.where((values - lo).abs() <= (hi - values).abs(), i - 1, i)
    return order.gather(-1, pick)


def _on_stored_grid(arrays: dict[str, mx.array], spec: Spec, target: torch.Tensor) -> mx.array:
    """The packed codes of `target` on each group's stored grid."""
    rows, cols = target.shape
    groups, gs = cols // spec.group_size, spec.group_size
    step = max(1, _ROWS_ELEMENTS // (cols * max(1, (1 << spec.bits) // gs)))
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = {k: v[r0:r1] for k, v in arrays.items()}
        table = _code_values(part, spec, r1 - r0, cols)
        codes = _nearest(target[r0:r1].reshape(r1 - r0, groups, gs), table)
        out.append(pack(codes.reshape(r1 - r0, cols).numpy(), spec.bits))
    return mx.array(np.concatenate(out, axis=0))


def requantize(arrays: dict[str, mx.array], spec: Spec, target: torch.Tensor
               ) -> tuple[dict[str, mx.array], torch.Tensor]:
    """`target` (fp32, (out, in)) in the format of `arrays`: per group the closer of the stored grid and
    a fresh quantization. Returns the new arrays and what they decode to (fp32)."""
    rows, cols = target.shape
    gs = spec.group_size
    src = mx.array(target.numpy())
    if spec.mode == "affine":  # scales in the dtype the layer was quantized from, as `quantize` keeps them
        src = src.astype(arrays["scales"].dtype)
    fresh_list = mx.quantize(src, gs, spec.bits, mode=spec.mode)
    fresh = {"weight": fresh_list[0], "scales": fresh_list[1]}
    if "biases" in arrays:
        fresh["biases"] = fresh_list[2]
    fresh = {k: v.astype(arrays[k].dtype) for k, v in fresh.items()}
    if spec.bits not in PACKED_BITS:
        return fresh, to_torch(decode(fresh, spec))
    kept = {**arrays, "weight": _on_stored_grid(arrays, spec, target)}
    groups = cols // gs

    def err(a: dict[str, mx.array]) -> tuple[torch.Tensor, torch.Tensor]:
        w = to_torch(decode(a, spec))
        return ((w - target) ** 2).reshape(rows, groups, gs).sum(-1), w

    e_kept, w_kept = err(kept)
    e_fresh, w_fresh = err(fresh)
    use_kept = e_kept <= e_fresh  # (rows, groups)
    pick = mx.array(use_kept.numpy())
    words = gs * spec.bits // 32
    out = {"weight": mx.where(pick[:, :, None], kept["weight"].reshape(rows, groups, words),
                              fresh["weight"].reshape(rows, groups, words)).reshape(rows, groups * words)}
    for k in ("scales", "biases"):
        if k in arrays:
            out[k] = mx.where(pick, kept[k], fresh[k])
    decoded = torch.where(use_kept[:, :, None], w_kept.reshape(rows, groups, gs), w_fresh.reshape(rows, groups, gs))
    return out, decoded.reshape(rows, cols)
