"""Shared pieces of the real-layout builders (tests/test_real_layouts.py): the `Built` record, the
registry, random factors and the trainers' delta formulas used to compute expected effects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

R = 4
Q, K, V = "layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v"
OUT, W1, W2 = "layers.0.attention.to_out.0", "layers.1.feed_forward.w1", "layers.29.feed_forward.w2"
ADA, CAP = "layers.3.adaLN_modulation.0", "cap_embedder.1"
FINAL, XEMB = "all_final_layer.2-1.linear", "all_x_embedder.2-1"


@dataclass
class Built:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # module -> trained scale
    effects: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> trained delta @ probe
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> trained bias diff


BUILDERS: dict[str, Callable] = {}
_G = torch.Generator().manual_seed(0)


def builder(name: str):
    def register(fn):
        BUILDERS[name] = fn
        return fn

    return register


def _rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=_G) * scale


def base_weight(shape: tuple[int, int]) -> torch.Tensor:
    """The base weight of a module of this shape, for algorithms whose delta depends on it (OFT): the
    meta-device inventory has none, so builders and the test share this deterministic one."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0] * 7 + shape[1])) * 0.02


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _lora(b: Built, ix, probe, module: str, down_key: str, up_key: str, *, alpha: float | None,
          scale: float | None = None, dtype=torch.float32, fold: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained LoRA (down, up) for `module` at scale alpha/R (1 without alpha); `fold` is multiplied
    into both saved factors (musubi convert_lora.py bakes sqrt(alpha/rank) into each)."""
    o, i = ix.shapes[module].shape
    down, up = _rand(R, i), _rand(o, R)
    trained = (alpha / R) if alpha is not None else 1.0
    b.tensors[down_key] = (down * fold).to(dtype)
    b.tensors[up_key] = (up * fold).to(dtype)
    b.scales[module] = trained if scale is None else scale
    b.effects[module] = trained * (up.to(dtype).float() @ (down.to(dtype).float() @ probe(i)))
    return down, up


def _kron_effect(w1: torch.Tensor, w2: torch.Tensor, scale: float, probe) -> torch.Tensor:
    d = torch.kron(w1.float(), w2.float())
    return scale * (d @ probe(d.shape[1]))
