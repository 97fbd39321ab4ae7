"""Adapters on a transformer using diffusers' `enable_layerwise_casting`: weights stored in float8,
cast to the compute dtype around each layer's forward by diffusers' hooks.

Expected outputs come from a plain model (no hooks) holding the same float8-rounded weights, with
the LoRA delta B @ A computed here from the factors written to the file (ai-toolkit keys, scale 1).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import apply_adapter, remove_adapter
from zimage_lora.apply.engine import REQUANT_WARN
from zimage_lora.examples import run_model, tiny_inputs, tiny_model

STORAGE = torch.float8_e4m3fn
TARGETS = ("layers.0.attention.to_q", "layers.1.feed_forward.w2", "noise_refiner.0.attention.to_out.0")


@pytest.fixture(autouse=True)
def _threads(one_torch_thread):
    return None


def lora_file(path, model, rank: int = 4, seed: int = 3) -> tuple[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for name in TARGETS:
        out_f, in_f = model.get_submodule(name).weight.shape
        down = torch.randn(rank, in_f, generator=g) / math.sqrt(in_f)
        up = torch.randn(out_f, rank, generator=g) * 0.5
        tensors[f"diffusion_model.{name}.lora_A.weight"] = down
        tensors[f"diffusion_model.{name}.lora_B.weight"] = up
        deltas[name] = up @ down
    save_file(tensors, str(path))
    return str(path), deltas


def cast_model(compute: torch.dtype) -> torch.nn.Module:
    model = tiny_model(seed=0, dtype=compute)
    model.enable_layerwise_casting(storage_dtype=STORAGE, compute_dtype=compute)
    return model


def stored(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, bytes]]:
    return {
        k: (v.dtype, v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for k, v in model.state_dict().items()
    }


def dense_reference(model: torch.nn.Module, compute: torch.dtype, deltas: dict, round_to_storage: bool):
    """A hook-free model with the cast model's stored weights (+ deltas, rounded to float8 if asked)."""
    ref = tiny_model(seed=0, dtype=compute)
    state = {}
    for k, v in model.state_dict().items():
        w = v.float()
        name = k.removesuffix(".weight")
        if k.endswith(".weight") and name in deltas:
            w = w + deltas[name]
            if round_to_storage:
                w = w.to(STORAGE).float()
        state[k] = w.to(compute)
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_dynamic_adapter_on_float8_storage(tmp_path, compute):
    model = cast_model(compute)
    assert model.get_submodule(TARGETS[0]).weight.dtype == STORAGE
    path, deltas = lora_file(tmp_path / "a.safetensors", model)
    inputs = tiny_inputs(seed=1, dtype=compute)
    before = stored(model)
    base = run_model(model, inputs)
    expected = run_model(dense_reference(model, compute, deltas, round_to_storage=False), inputs)

    apply_adapter(model, path, name="a")
    out = run_model(model, inputs)
    assert model.get_submodule(TARGETS[0]).weight.dtype == STORAGE  # diffusers' hook still casts back
    effect = float((expected - base).norm())
    assert effect > 1e-2 * float(base.norm())
    tol = 1e-4 if compute == torch.float32 else 3e-2  # bf16: the reference rounds W + dW once more
    assert float((out - expected).norm()) / effect < tol

    remove_adapter(model, "a")
    assert stored(model) == before
    assert torch.equal(run_model(model, inputs), base)


@pytest.mark.parametrize("strength", [1.0, 0.02])
def test_merged_adapter_reports_float8_rounding_loss(tmp_path, strength):
    compute = torch.float32
    model = cast_model(compute)
    path, deltas = lora_file(tmp_path / "a.safetensors", model)
    inputs = tiny_inputs(seed=1, dtype=compute)
    before = stored(model)
    originals = {n: model.get_submodule(n).weight.detach().float().clone() for n in TARGETS}
    base = run_model(model, inputs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = apply_adapter(model, path, name="a", mode="merged", scale=strength)
    assert set(report.requant_loss) == set(TARGETS)
    for name in TARGETS:
        weight = model.get_submodule(name).weight.detach()
        assert weight.dtype == STORAGE
        delta = strength * deltas[name]
        wanted = originals[name] + delta
        loss = float((wanted.to(STORAGE).float() - wanted).norm() / delta.norm())
        assert report.requant_loss[name] == pytest.approx(loss, rel=1e-4)
        assert loss > 0.01  # float8 e4m3 keeps 3 mantissa bits
        assert torch.equal(weight.float(), wanted.to(STORAGE).float())  # one rounding of W + dW
    # as for quantized layers: a warning naming dynamic mode for each layer that lost over 10%
    lossy = {n for n, v in report.requant_loss.items() if v > REQUANT_WARN}
    messages = [str(w.message) for w in caught]
    warned = {n for n in TARGETS for m in messages if f"'{n}' lost" in m and "mode='dynamic'" in m}
    assert warned == lossy
    assert bool(lossy) == (strength < 0.1)  # a small delta drowns in the float8 step

    expected = run_model(dense_reference(model, compute, {}, round_to_storage=False), inputs)
    out = run_model(model, inputs)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)  # the merged float8 weights are what runs

    remove_adapter(model)
    assert stored(model) == before
    assert torch.equal(run_model(model, inputs), base)


def test_plain_merge_reports_no_rounding_loss(tmp_path):
    model = tiny_model(seed=0)
    path, _ = lora_file(tmp_path / "a.safetensors", model)
    assert apply_adapter(model, path, name="a", mode="merged").requant_loss == {}
