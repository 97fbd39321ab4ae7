"""The MLX module tree seen through the library's key resolution.

Keys are resolved against the model's own tree: every `nn.Linear` / `nn.QuantizedLinear` (and every
norm with a weight) is registered under the name diffusers' `ZImageTransformer2DModel` gives the same
layer, so `keys.ModuleIndex` (aliases, fused/split q/k/v, flattened kohya names) and every layout work
unchanged. mflux's Z-Image tree uses diffusers' names except in the few places listed in `RENAMES`.
Arrays cross between MLX and torch only here: fp32 on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import mlx.core as mx
import numpy as np
import torch
from mlx import nn

from ..keys import ModuleIndex
from ..keys.index import ModuleShape

#: (MLX segment, diffusers segment): where mflux's tree spells a layer differently. Applied only when
#: the MLX name has the segment, so a tree already spelled the diffusers way maps to itself.
RENAMES: tuple[tuple[str, str], ...] = (
    ("t_embedder.linear1", "t_embedder.mlp.0"),
    ("t_embedder.linear2", "t_embedder.mlp.2"),
    ("adaLN_modulation.0", "adaLN_modulation.1"),  # final layer only: diffusers puts a SiLU at .0 there
)


def transformer_of(model: Any) -> nn.Module:
    """mflux's `ZImage` (text encoder, VAE and transformer in one module) stands for its transformer."""
    inner = getattr(model, "transformer", None)
    return inner if isinstance(inner, nn.Module) else model


def is_linear(module: Any) -> bool:
    return isinstance(module, (nn.Linear, nn.QuantizedLinear))


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or QuantizedLinear (the packed weight's width is not `in`)."""
    if isinstance(module, nn.QuantizedLinear):
        return int(module.weight.shape[0]), int(module.scales.shape[-1]) * int(module.group_size)
    return int(module.weight.shape[0]), int(module.weight.shape[1])


def diffusers_name(name: str) -> str:
    out = name
    for mlx_seg, torch_seg in RENAMES:
        if mlx_seg == "adaLN_modulation.0" and not name.startswith("all_final_layer."):
            continue
        out = f".{out}.".replace(f".{mlx_seg}.", f".{torch_seg}.", 1)[1:-1]
    return out


@dataclass
class _Shape:
    """What `keys.index.module_shape` reads of a module: in/out features and whether it has a bias."""

    in_features: int
    out_features: int
    bias: object = None

    def children(self) -> list[Any]:
        return []


@dataclass
class _Norm:
    weight: torch.Tensor  # a meta tensor: only its shape is read
    bias: object = None

    def children(self) -> list[Any]:
        return []


class _Proxy:
    """A stand-in for `torch.nn.Module.named_modules`, under diffusers' names."""

    def __init__(self, entries: list[tuple[str, Any]]) -> None:
        self.entries = entries

    def named_modules(self) -> Iterator[tuple[str, Any]]:
        return iter(self.entries)


class Tree:
    """The adaptable layers of an MLX model: diffusers name -> MLX path, and the index over them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.path: dict[str, str] = {}  # diffusers name -> MLX path
        entries: list[tuple[str, Any]] = []
        for name, module in named_modules(model):
            if not name:
                continue
            if is_linear(module):
                out_f, in_f = linear_shape(module)
                proxy: Any = _Shape(in_f, out_f, True if "bias" in module else None)
            elif isinstance(module, (nn.RMSNorm, nn.LayerNorm)) and "weight" in module:
                proxy = _Norm(torch.empty(tuple(module.weight.shape), device="meta"))  # "norm" in its name
            else:
                continue
            torch_name = diffusers_name(name)
            self.path[torch_name] = name
            entries.append((torch_name, proxy))
        self.index = ModuleIndex(cast(Any, _Proxy(entries)))  # read as a torch module tree

    def get(self, torch_name: str) -> nn.Module:
        return cast(nn.Module, get_path(self.model, self.path[torch_name]))

    def set(self, torch_name: str, module: nn.Module) -> None:
        set_path(self.model, self.path[torch_name], module)


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()` (untyped in mlx)."""
    return cast(Callable[[], list[tuple[str, nn.Module]]], model.named_modules)()


def _step(node: Any, part: str) -> Any:
    if isinstance(node, list):
        return node[int(part)]
    return node[part]  # Module and dict: both are dicts of their children


def get_path(model: nn.Module, path: str) -> Any:
    node: Any = model
    for part in path.split("."):
        node = _step(node, part)
    return node


def set_path(model: nn.Module, path: str, value: Any) -> None:
    """Put `value` at `path`, in the container that holds it (a module, a list or a dict of the tree)."""
    parent_path, _, last = path.rpartition(".")
    parent = get_path(model, parent_path) if parent_path else model
    if isinstance(parent, list):
        parent[int(last)] = value
    elif isinstance(parent, nn.Module):
        setattr(parent, last, value)
    else:
        parent[last] = value


def to_torch(a: mx.array) -> torch.Tensor:
    """An MLX array as an fp32 CPU tensor (bf16 has no numpy type: MLX widens it first, exactly)."""
    return torch.from_numpy(np.array(a.astype(mx.float32), copy=True))


def to_mx(t: torch.Tensor, dtype: mx.Dtype) -> mx.array:
    """An fp32 tensor into MLX, rounded once into `dtype`."""
    return mx.array(t.detach().float().contiguous().numpy()).astype(dtype)


__all__ = ["Tree", "ModuleShape", "diffusers_name", "is_linear", "linear_shape", "to_mx", "to_torch", "transformer_of"]
