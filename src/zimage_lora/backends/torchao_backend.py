"""torchao weight-only tensors on `nn.Linear`, as made by `quantize_` or diffusers' `TorchAoConfig`.

Handled: `Int8Tensor` (`Int8WeightOnlyConfig`), `Float8Tensor` (`Float8WeightOnlyConfig`) and
`IntxUnpackedToInt8Tensor` (`IntxWeightOnlyConfig`, e.g. int4 with per-group scales, which is the int4
form torchao runs on CPU). The module stays a plain `nn.Linear`; only its weight is a tensor subclass.

Merging requantizes with the tensor's own `from_hp` and the original block size, target dtype and
activation settings (for per-group int4/intx, each group keeps its stored scale where that still fits
the merged group: `_requant`), then copies the new data and scales into the existing inner tensors, so the
parameter object, its layout and every alias of it stay as they were. Restore copies the kept inner
tensors back the same way.
"""

from __future__ import annotations

from typing import Any

import torch
from torchao.quantization import Float8Tensor, Int8Tensor, IntxUnpackedToInt8Tensor, PerRow, PerTensor
from torchao.quantization.quant_primitives import _DTYPE_TO_QVALUE_BOUNDS, MappingType

from ..errors import UnsupportedError
from ._requant import keep_stored, uniform_codes

_TYPES = (Int8Tensor, Float8Tensor, IntxUnpackedToInt8Tensor)
# One of `_TYPES`: torchao ships no type information, so its tensor subclasses are opaque to the checker.
QuantTensor = Any


def _inner(weight: QuantTensor) -> dict[str, torch.Tensor]:
    names, _meta = weight.__tensor_flatten__()
    return {n: getattr(weight, n) for n in names if isinstance(getattr(weight, n, None), torch.Tensor)}


def _granularity(weight: QuantTensor) -> PerRow | PerTensor:
    block = list(weight.block_size)
    if block == list(weight.shape):
        return PerTensor()
    if block == [1, weight.shape[1]]:
        return PerRow()
    raise UnsupportedError(
        f"torchao {type(weight).__name__} with block size {block} on a {tuple(weight.shape)} weight cannot be "
        "requantized (only per-row and per-tensor scales are supported); use mode='dynamic'"
    )


def _requantize(old: QuantTensor, dense: torch.Tensor) -> QuantTensor:
    # Quantize from the layer's own high-precision dtype, as quantize_ did when the model was loaded.
    hp = dense.to(device=old.qdata.device, dtype=old.dtype)
    if isinstance(old, Int8Tensor):
        symmetric = old.zero_point is None or not bool(old.zero_point.any())
        return Int8Tensor.from_hp(
            hp,
            granularity=_granularity(old),
            mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
            act_quant_kwargs=old.act_quant_kwargs,
            reduce_range=old.reduce_range,
        )
    if isinstance(old, Float8Tensor):
        return Float8Tensor.from_hp(
            hp,
            float8_dtype=old.qdata.dtype,
            granularity=_granularity(old),
            mm_config=old.mm_config,
            kernel_preference=old.kernel_preference,
            act_quant_kwargs=old.act_quant_kwargs,
        )
    symmetric = not bool(old.zero_point.any())
    return IntxUnpackedToInt8Tensor.from_hp(
        hp,
        tuple(old.block_size),
        old.target_dtype,
        mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
        activation_quantization=old.activation_quantization,
    )


def _keep_group_scales(old: QuantTensor, new: QuantTensor, dense: torch.Tensor) -> None:
    """In `new` (an `IntxUnpackedToInt8Tensor` requantized from `dense`), put back each group's stored
    scale and zero point from `old`, with codes rounded on that grid, where that decodes closer to
    `dense` than the freshly picked ones (`_requant`): the base is then not rounded a second time."""
    rows, cols = dense.shape
    g = old.block_size[1]
    if old.block_size[0] != 1 or cols % g:
        return
    lo, hi = _DTYPE_TO_QVALUE_BOUNDS[old.target_dtype]
    v = dense.float().reshape(-1, g)

    def grid(t: QuantTensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t.scale.float().reshape(-1, 1), t.zero_point.float().reshape(-1, 1)

    d, zp = grid(old)
    q = uniform_codes(v, d, -zp * d, lo, hi)  # (q - zp) * d = v  <=>  q = round(v / d + zp)
    d_new, zp_new = grid(new)
    fresh = (new.qdata.float().reshape(-1, g) - zp_new) * d_new
    kept = keep_stored(v, (q - zp) * d, fresh)
    with torch.no_grad():
        new.qdata.view(-1, g)[kept] = q[kept].to(new.qdata.dtype)
        new.scale.view(-1)[kept] = old.scale.reshape(-1)[kept]
        new.zero_point.view(-1)[kept] = old.zero_point.reshape(-1)[kept]


class TorchAOBackend:
    name = "torchao"
    supports_merge = True

    def matches(self, module: torch.nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return isinstance(weight, _TYPES) and weight.dim() == 2

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        w: QuantTensor = module.weight
        return (w.shape[0], w.shape[1])

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        w: QuantTensor = module.weight
        dense: torch.Tensor = w.dequantize().float()
        return dense

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        old: QuantTensor = module.weight
        new = _requantize(old, weight.reshape(old.shape))
        if isinstance(old, IntxUnpackedToInt8Tensor):
            _keep_group_scales(old, new, weight.reshape(old.shape))
        target, source = _inner(old), _inner(new)
        if target.keys() != source.keys() or any(
            target[k].shape != source[k].shape or target[k].dtype != source[k].dtype for k in target
        ):
            got = {k: tuple(v.shape) for k, v in source.items()}
            want = {k: tuple(v.shape) for k, v in target.items()}
            raise UnsupportedError(
                f"requantizing a torchao {type(old).__name__} gave a different layout ({got} vs {want}); "
                "use mode='dynamic'"
            )
        with torch.no_grad():
            for key, tensor in target.items():
                tensor.copy_(source[key])

    def snapshot(self, module: torch.nn.Module) -> Any:
        return {k: v.detach().clone() for k, v in _inner(module.weight).items()}

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        current = _inner(module.weight)
        with torch.no_grad():
            for key, saved in state.items():
                current[key].copy_(saved)
