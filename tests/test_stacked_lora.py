"""Several plain LoRA adapters on one layer run as one product with the summed rank (kernels.fused_lora_).

On CPU (no Triton) that is one `x @ A^T` and one `addmm_` for all of them, instead of one pair per
adapter. Expected outputs are computed in fp64 from the factors, independently of the engine.
"""

from __future__ import annotations

import torch

from zimage_lora import Adapter, Target, apply_adapter, set_active_adapters, set_adapter_scale
from zimage_lora.apply import kernels

N_IN, N_OUT, TOKENS = 48, 40, 9


class Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(N_IN, N_OUT).requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _setup(ranks=(2, 5, 3), strengths=(0.7, -1.2, 2.0)):
    model = Holder()
    g = torch.Generator().manual_seed(1)
    factors = []
    for i, (rank, s) in enumerate(zip(ranks, strengths, strict=True)):
        down, up = torch.randn(rank, N_IN, generator=g), torch.randn(N_OUT, rank, generator=g)
        factors.append((down, up))
        target = Target(module="layer", algorithm="lora", tensors={"down": down, "up": up}, scale=1.0, rank=rank)
        apply_adapter(model, Adapter(name=f"a{i}", format="t", source="t", targets=[target]),
                      mode="dynamic", name=f"a{i}", scale=s)
    return model, factors


def _expected(model, x, factors, strengths) -> torch.Tensor:
    lin = model.layer.base_layer
    y = x.double() @ lin.weight.double().T + lin.bias.double()
    for (down, up), s in zip(factors, strengths, strict=True):
        y = y + s * (x.double() @ down.double().T) @ up.double().T
    return y


def _rel(got, want, base) -> float:
    return float((got.double() - want).norm() / (want - base).norm())


def test_stacked_adapters_are_one_addmm(monkeypatch):
    model, factors = _setup()
    x = torch.randn(TOKENS, N_IN, generator=torch.Generator().manual_seed(2))
    calls = []
    real = kernels._torch_lora_add_

    def counting(out, x, down, up, alpha):
        calls.append(down.shape[0])
        real(out, x, down, up, alpha)

    monkeypatch.setattr(kernels, "_torch_lora_add_", counting)
    with torch.no_grad():
        got = model(x)
        base = model.layer.base_layer(x).double()
    assert calls == [2 + 5 + 3]
    assert _rel(got, _expected(model, x, factors, (0.7, -1.2, 2.0)), base) < 1e-6


def test_stacked_product_follows_strength_and_active_set():
    model, factors = _setup()
    x = torch.randn(TOKENS, N_IN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model.layer.base_layer(x).double()
        model(x)  # builds and caches the concatenation
        set_adapter_scale(model, "a1", 0.25)
        assert _rel(model(x), _expected(model, x, factors, (0.7, 0.25, 2.0)), base) < 1e-6
        set_active_adapters(model, ["a0", "a2"])
        assert _rel(model(x), _expected(model, x, [factors[0], factors[2]], (0.7, 2.0)), base) < 1e-6
        set_active_adapters(model, ["a2"])  # one adapter: the per-slot path
        assert _rel(model(x), _expected(model, x, [factors[2]], (2.0,)), base) < 1e-6


def test_hot_swapped_factors_reach_the_stacked_product():
    """New values copied into a slot's buffers (same shapes) invalidate the cached concatenation."""
    model, factors = _setup()
    x = torch.randn(TOKENS, N_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        base = model.layer.base_layer(x).double()
        model(x)
        slot = model.layer._active[0][1]
        new_up = torch.randn(N_OUT, 5, generator=torch.Generator().manual_seed(5))
        slot.load_({"down": slot.down.clone(), "up": new_up})
        factors[1] = (factors[1][0], new_up)
        assert _rel(model(x), _expected(model, x, factors, (0.7, -1.2, 2.0)), base) < 1e-6
