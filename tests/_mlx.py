"""Tiny MLX twins of the tiny diffusers model, for the MLX backend's tests.

`mflux_twin`: mflux's own `ZImageTransformer`, its weights copied from the diffusers model through
mflux's own weight mapping (what mflux does with a real checkpoint). `mirror`: a bare MLX module tree
holding an `nn.Linear` / `nn.RMSNorm` copy of each of the diffusers model's layers under the same
names (an MLX model that uses Z-Image's names), for the tests that must run without mflux.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import torch
from mlx import nn

from zimage_lora.examples import TINY_CONFIG


def to_mx(t: torch.Tensor) -> mx.array:
    return mx.array(t.detach().float().numpy())


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def mflux_twin(model: torch.nn.Module):
    from mflux.models.common.weights.mapping.weight_mapper import WeightMapper
    from mflux.models.z_image.model.z_image_transformer.transformer import ZImageTransformer
    from mflux.models.z_image.weights.z_image_weight_mapping import ZImageWeightMapping

    c = TINY_CONFIG
    twin = ZImageTransformer(patch_size=2, f_patch_size=1, in_channels=c["in_channels"], dim=c["dim"],
                             n_layers=c["n_layers"], n_refiner_layers=c["n_refiner_layers"], n_heads=c["n_heads"],
                             cap_feat_dim=c["cap_feat_dim"], axes_dims=c["axes_dims"], axes_lens=c["axes_lens"])
    weights = {k: to_mx(v) for k, v in model.state_dict().items()}
    twin.update(WeightMapper.apply_mapping(weights, ZImageWeightMapping.get_transformer_mapping(),
                                           num_layers=c["n_layers"]))
    twin.set_float32(True)  # fp32 throughout (by default mflux casts the time embedding to bf16)
    mx.eval(twin.parameters())
    return twin


def inputs(seed: int = 0) -> dict:
    """Image tokens and caption length multiples of 32: neither model pads (their padding differs)."""
    g = torch.Generator().manual_seed(seed)
    return {"x": [torch.randn(TINY_CONFIG["in_channels"], 1, 16, 16, generator=g)], "t": torch.tensor([0.5]),
            "cap_feats": [torch.randn(32, TINY_CONFIG["cap_feat_dim"], generator=g)]}


def run_twin(twin, inp: dict) -> torch.Tensor:
    """mflux's output for the diffusers inputs, in diffusers' sign (mflux returns the negated velocity)."""
    out = twin(to_mx(inp["x"][0]), float(inp["t"][0]), None, to_mx(inp["cap_feats"][0]))
    return -torch.from_numpy(to_np(out))


class _Node(nn.Module):
    pass


def mirror(model: torch.nn.Module) -> nn.Module:
    """Every Linear and RMSNorm of `model` as MLX layers under the same dotted names."""
    root = _Node()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layer = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            layer.weight = to_mx(module.weight)
            if module.bias is not None:
                layer.bias = to_mx(module.bias)
        elif type(module).__name__ == "RMSNorm" and getattr(module, "weight", None) is not None:
            layer = nn.RMSNorm(module.weight.shape[0])
            layer.weight = to_mx(module.weight)
        else:
            continue
        _put(root, name.split("."), layer)
    return root


def _put(node, parts: list[str], layer) -> None:
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        i = int(head)
        while len(node) <= i:
            node.append(nn.Identity())
        if not rest:
            node[i] = layer
            return
        if isinstance(node[i], nn.Identity):
            node[i] = [] if rest[0].isdigit() else _Node()
        _put(node[i], rest, layer)
        return
    if not rest:
        setattr(node, head, layer)
        return
    if head not in node:
        setattr(node, head, [] if rest[0].isdigit() else _Node())
    _put(node[head], rest, layer)


def quantize(model: nn.Module, group_size: int, bits: int, mode: str = "affine") -> nn.Module:
    """Every Linear whose width the group divides, as a QuantizedLinear (as mflux's -q does)."""
    nn.quantize(model, group_size, bits, mode=mode,
                class_predicate=lambda _p, m: isinstance(m, nn.Linear) and m.weight.shape[1] % group_size == 0)
    return model
