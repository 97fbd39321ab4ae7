"""Run by tests/test_triton_lora.py in a subprocess: with TRITON_INTERPRET=1 (set before triton is
imported) the Triton LoRA kernels run on CPU tensors, without it on CUDA ones; each against the unfused
torch reference. Prints one JSON object of measured errors; the test module asserts on them."""

from __future__ import annotations

import json
import os
import sys

import torch  # noqa: E402

from zimage_lora import Adapter, Target, apply_adapter, set_adapter_scale  # noqa: E402
from zimage_lora.apply import kernels, triton_lora  # noqa: E402

DEV = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOKENS, N_IN, N_OUT = 37, 96, 77  # odd sizes: partial tiles on every edge


def _factors(rank: int, dtype: torch.dtype, seed: int, n_in: int = N_IN, n_out: int = N_OUT):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, n_in, generator=g) / n_in**0.5
    up = torch.randn(n_out, rank, generator=g) / rank**0.5
    return down.to(DEV, dtype), up.to(DEV, dtype)


def _errors(got: torch.Tensor, unfused: torch.Tensor, exact: torch.Tensor, effect: torch.Tensor) -> dict:
    """Errors of the kernel and of the unfused torch path against an fp64 reference, relative to the
    size of the adapter's effect on the output."""
    size = float(effect.norm())
    return {
        "fused": float((got.double() - exact).norm()) / size,
        "unfused": float((unfused.double() - exact).norm()) / size,
        "vs_unfused": float((got.double() - unfused.double()).norm()) / size,
    }


def epilogue_cases() -> dict:
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, dtype in DTYPES.items():
        x = torch.randn(TOKENS, N_IN, generator=g).to(DEV, dtype)
        base = torch.randn(TOKENS, N_OUT + 9, generator=g).to(DEV, dtype)
        for rank in (1, 16, 128):
            down, up = _factors(rank, dtype, rank)
            effect = 0.7 * (x.double() @ down.double().T) @ up.double().T
            # a column slice of a wider output: the kernel writes through strides, touching nothing else
            got = base.clone()
            triton_lora.lora_epilogue_(got[:, 3 : 3 + N_OUT], x, down, up, 0.7)
            ref = base.clone()
            ref[:, 3 : 3 + N_OUT].addmm_(x @ down.T, up.T, alpha=0.7)
            exact = base.double()
            exact[:, 3 : 3 + N_OUT] += effect
            errs = _errors(got, ref, exact, effect)
            left, right = slice(0, 3), slice(3 + N_OUT, None)
            errs["outside_untouched"] = bool(
                torch.equal(got[:, left], base[:, left]) and torch.equal(got[:, right], base[:, right])
            )
            out[f"epilogue-{name}-r{rank}"] = errs
    return out


def linear_cases() -> dict:
    out = {}
    g = torch.Generator().manual_seed(1)
    for name, dtype in DTYPES.items():
        x = torch.randn(TOKENS, N_IN, generator=g).to(DEV, dtype)
        w = (torch.randn(N_OUT, N_IN, generator=g) / N_IN**0.5).to(DEV, dtype)
        bias = torch.randn(N_OUT, generator=g).to(DEV, dtype)
        for rank in (1, 16, 128):
            down, up = _factors(rank, dtype, rank + 1)
            got = triton_lora.linear_lora(x, w, bias, down, up, 0.5)
            ref = torch.nn.functional.linear(x, w, bias)
            ref.addmm_(x @ down.T, up.T, alpha=0.5)
            effect = 0.5 * (x.double() @ down.double().T) @ up.double().T
            exact = x.double() @ w.double().T + bias.double() + effect
            out[f"linear-{name}-r{rank}"] = _errors(got, ref, exact, effect)
    return out


class Holder(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _sum_exact(base, x, factors, scales, dtype):
    y = base.double()
    for (down, up), s in zip(factors, scales, strict=True):
        y = y + s * (x.double() @ down.to(dtype).double().T) @ up.to(dtype).double().T
    return y


def _sum_unfused(base, x, factors, scales, dtype):
    y = base.clone()
    for (down, up), s in zip(factors, scales, strict=True):
        y.addmm_(x @ down.to(dtype).T, up.to(dtype).T, alpha=s)
    return y


def _stacked_one(dtype: torch.dtype, g: torch.Generator, calls: list) -> dict:
    lin = torch.nn.Linear(N_IN, N_OUT, bias=True).to(DEV, dtype).requires_grad_(False)
    model = Holder(lin)
    x = torch.randn(TOKENS, N_IN, generator=g).to(DEV, dtype)
    base = lin(x)
    ranks, strengths = (4, 16, 32), (0.8, -1.5, 0.3)
    factors = []
    for i, (rank, s) in enumerate(zip(ranks, strengths, strict=True)):
        down, up = _factors(rank, torch.float32, 10 + i)
        factors.append((down, up))
        target = Target(module="layer", algorithm="lora", tensors={"down": down, "up": up}, scale=1.0, rank=rank)
        apply_adapter(model, Adapter(name=f"a{i}", format="t", source="t", targets=[target]),
                      mode="dynamic", name=f"a{i}", scale=s)
    model(x)  # the first call moves the prepared factors to x's dtype
    calls.clear()
    got = model(x)
    exact = _sum_exact(base, x, factors, strengths, dtype)
    errs = _errors(got, _sum_unfused(base, x, factors, strengths, dtype), exact, exact - base.double())
    errs["calls"] = list(calls)
    # a new strength must reach the cached concatenation
    set_adapter_scale(model, "a1", 0.25)
    scales2 = (0.8, 0.25, 0.3)
    exact2 = _sum_exact(base, x, factors, scales2, dtype)
    e2 = _errors(model(x), _sum_unfused(base, x, factors, scales2, dtype), exact2, exact2 - base.double())
    errs["after_scale_fused"] = e2["fused"]
    errs["after_scale_unfused"] = e2["unfused"]
    return errs


def stacked_cases() -> dict:
    """Several adapters on one wrapped Linear: one kernel call per forward, the summed product."""
    calls: list[int] = []
    real = triton_lora.lora_epilogue_

    def counting(out, x, down, up, alpha):
        calls.append(down.shape[0])
        return real(out, x, down, up, alpha)

    triton_lora.lora_epilogue_ = counting
    g = torch.Generator().manual_seed(2)
    try:
        return {f"stacked-{name}": _stacked_one(dtype, g, calls) for name, dtype in DTYPES.items()}
    finally:
        triton_lora.lora_epilogue_ = real


def dispatch_case() -> dict:
    """kernels.lora_add_ routes to the kernel when Triton can run on the tensors."""
    calls = []
    real = triton_lora.lora_epilogue_
    triton_lora.lora_epilogue_ = lambda *a: calls.append(1) or real(*a)
    down, up = _factors(8, torch.float32, 3)
    x = torch.randn(5, N_IN).to(DEV)
    out = torch.zeros(5, N_OUT, device=DEV)
    kernels.lora_add_(out, x, down, up, 2.0)
    triton_lora.lora_epilogue_ = real
    ref = 2.0 * (x @ down.T) @ up.T
    return {"dispatch": {"calls": len(calls), "err": float((out - ref).abs().max())}}


def fallback_case() -> dict:
    """A kernel that cannot build falls back to the torch path, with one warning (run last: it switches
    the kernels off for the rest of the process)."""
    import warnings

    real = triton_lora.lora_epilogue_

    def broken(*_args):
        raise RuntimeError("no C compiler")

    triton_lora.lora_epilogue_ = broken
    down, up = _factors(8, torch.float32, 4)
    x = torch.randn(5, N_IN).to(DEV)
    outs = [torch.zeros(5, N_OUT, device=DEV) for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for out in outs:
            kernels.lora_add_(out, x, down, up, 2.0)
    triton_lora.lora_epilogue_ = real
    ref = 2.0 * (x @ down.T) @ up.T
    return {"fallback": {"err": max(float((o - ref).abs().max()) for o in outs),
                         "warnings": sum("Triton LoRA kernel unavailable" in str(w.message) for w in caught),
                         "off": kernels._triton(x) is None}}


if __name__ == "__main__":
    results = {"device": DEV, **epilogue_cases(), **linear_cases(), **stacked_cases(), **dispatch_case(),
               **fallback_case()}
    json.dump(results, sys.stdout)
