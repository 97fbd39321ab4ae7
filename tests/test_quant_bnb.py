"""bitsandbytes Linear4bit (nf4, fp4; with and without double quantization) and Linear8bitLt on CPU.

Layers are built directly (diffusers' BitsAndBytesConfig needs CUDA). The CPU kernel layout that
bitsandbytes switches a 4-bit weight to on its first eval forward (on AVX512-BF16 machines) is
produced here with bitsandbytes' own conversion, so the test runs on any CPU.
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from _quant import check_engine, dense_reference, lowrank_delta, raw_bytes, raw_state, replace_linears

from zimage_lora.backends import backend_for
from zimage_lora.backends.bnb_backend import BnB4bitBackend, BnB8bitBackend
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.keys.index import module_shape

KINDS = ["nf4", "fp4", "nf4-double", "int8"]


def quantize(lin: torch.nn.Linear, kind: str) -> torch.nn.Module:
    bias = lin.bias is not None
    if kind == "int8":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    else:
        qt = kind.split("-")[0]
        double = kind.endswith("double")
        new = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=bias, quant_type=qt, compress_statistics=double,
            compute_dtype=torch.float32,
        )
        new.weight = bnb.nn.Params4bit(
            lin.weight.detach().clone(), requires_grad=False, quant_type=qt, compress_statistics=double
        )
    if bias:
        new.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return new.to("cpu").eval()


def cpu_repack(module: torch.nn.Module) -> None:
    """What Linear4bit.forward does on AVX512-BF16 CPUs (bitsandbytes' own conversion)."""
    module.weight.data, module.weight.quant_state = F._convert_weight_packed_for_cpu(
        module.weight.data, module.weight.quant_state
    )


def state_bytes(module: torch.nn.Module) -> dict[str, bytes]:
    """Every tensor the layer's weight is made of, as raw bytes, plus the non-tensor quant settings."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return {"CB": raw_bytes(module.weight.data), "SCB": raw_bytes(scb)}
    out = {"data": raw_bytes(module.weight.data)}

    def walk(prefix: str, state) -> None:
        for key, value in sorted(vars(state).items()):
            if isinstance(value, torch.Tensor):
                out[prefix + key] = raw_bytes(value)
            elif type(value).__name__ == "QuantState":
                walk(prefix + key + ".", value)
            else:
                out[prefix + key] = repr(value).encode()

    walk("state.", module.weight.quant_state)
    return out


def reference_dequant(module: torch.nn.Module) -> torch.Tensor:
    """bitsandbytes' own decoders (the 4-bit CPU layout is first converted back by bitsandbytes)."""
    if isinstance(module, bnb.nn.Linear8bitLt):
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return module.weight.data.float() * scb.float()[:, None] / 127
    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        state = copy.deepcopy(state)
        state.original_nested = False  # keep absmax as the kernel sees it (bf16), do not re-quantize it
        data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), state)
        state.absmax = state.absmax.T.reshape(-1).float()
        state.dtype = torch.float32
    return F.dequantize_4bit(data, state).float()


def layer(kind: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(256, 128)
    return quantize(lin, kind), lin.weight.detach().clone()


@pytest.mark.parametrize("kind", KINDS)
def test_recognised_with_logical_shape(kind):
    q, _ = layer(kind)
    backend = backend_for(q)
    assert isinstance(backend, BnB8bitBackend if kind == "int8" else BnB4bitBackend) and backend.supports_merge
    assert backend.shape(q) == (128, 256) and module_shape(q).shape == (128, 256)


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_matches_bitsandbytes_and_forward(kind):
    q, dense = layer(kind)
    backend = backend_for(q)
    got = backend.get_base_weight(q)
    assert got.shape == (128, 256) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference_dequant(q), rtol=1e-6, atol=1e-7)
    assert (got - dense).norm() / dense.norm() < 0.15
    if kind != "int8":  # LLM.int8 also quantizes the activations, so only 4-bit equals dequant + matmul
        x = torch.randn(3, 256)
        torch.testing.assert_close(q(x), torch.nn.functional.linear(x, got, q.bias), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-double"])
def test_dequantize_after_cpu_repack(kind):
    q, _ = layer(kind)
    backend = backend_for(q)
    before = backend.get_base_weight(q)
    cpu_repack(q)
    assert q.weight.quant_state.packing_format_for_cpu and q.weight.shape == (128, 128)
    after = backend.get_base_weight(q)
    torch.testing.assert_close(after, reference_dequant(q), rtol=0, atol=0)
    # The kernel layout only rounds absmax to bf16: the weight is the same to bf16 precision.
    torch.testing.assert_close(after, before, rtol=8e-3, atol=0)
    assert backend.shape(q) == (128, 256)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("repacked", [False, True])
def test_requantize_and_restore_exact(kind, repacked):
    if repacked and kind == "int8":
        pytest.skip("only 4-bit weights are repacked")
    q, _ = layer(kind)
    if repacked:
        cpu_repack(q)
    backend = backend_for(q)
    before = state_bytes(q)
    x = torch.randn(4, 256)
    out_before = q(x)
    snap = backend.snapshot(q)

    base = backend.get_base_weight(q)
    delta = lowrank_delta(base)  # rank 16, 20% of the weight's norm
    backend.set_base_weight(q, base + delta)
    assert state_bytes(q) != before
    loss = float((backend.get_base_weight(q) - base - delta).norm() / delta.norm())
    assert 0 < loss < (0.1 if kind == "int8" else 0.8)
    torch.testing.assert_close(backend.get_base_weight(q), reference_dequant(q), rtol=1e-6, atol=1e-7)

    for _ in range(2):
        backend.restore(q, snap)
        assert state_bytes(q) == before
        assert torch.equal(q(x), out_before)
        if not repacked and kind != "int8":
            cpu_repack(q)  # a forward on an AVX512-BF16 CPU mutates the state; the snapshot must not follow
        backend.set_base_weight(q, base - delta)


def _quantized_tiny(kind: str) -> torch.nn.Module:
    model = copy.deepcopy(tiny_model(0))
    replace_linears(model, lambda _n, lin: quantize(lin, kind) if lin.in_features % 64 == 0 else None)
    return model


def _raw_state(model: torch.nn.Module) -> dict[str, bytes]:
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return raw_state(model, lambda m: state_bytes(m) if isinstance(m, quantized) else None)


def _decode(module: torch.nn.Module) -> torch.Tensor | None:
    return reference_dequant(module) if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) else None


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_engine_dynamic_merged_restore(kind, tmp_path):
    quant = _quantized_tiny(kind)
    assert sum(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in quant.modules()) > 20
    dense = dense_reference(quant, _decode)
    adapter = make_adapter("ai-toolkit", tmp_path / "a.safetensors", tiny_model(0), rank=4, alpha=4.0)
    # LLM.int8 quantizes activations in its kernel, so the quantized base itself differs from the dense one.
    losses = check_engine(quant, dense, adapter, _raw_state, _decode, dynamic_tol=1e-4 if kind == "nf4" else 0.1)
    assert all(0 < v < 5 for v in losses.values())
