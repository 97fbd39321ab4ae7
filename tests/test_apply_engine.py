"""Engine behaviour: exact restore, stacking, re-weighting, replacing, failures mid-way (fused targets:
test_apply_fused.py)."""

from __future__ import annotations

import math

import pytest
import torch
from _apply_util import TOL, Pristine, adapter_file, output, rel_err
from safetensors.torch import save_file

from zimage_lora import (
    Adapter,
    IncompatibleWeightsError,
    LoRAError,
    Target,
    apply_adapter,
    examples,
    list_adapters,
    load_adapter,
    remove_adapter,
    set_adapter_scale,
)
from zimage_lora.apply import AdapterLinear, merge
from zimage_lora.apply.slot import Slot


def _norm_adapter(model, seed=0) -> Adapter:
    """Full diffs on two norm layers (ComfyUI files carry these) plus one on a biased Linear."""
    g = torch.Generator().manual_seed(seed)
    targets = [
        Target("layers.0.attention_norm1", "full", {"diff": torch.randn(64, generator=g) * 0.1}),
        Target("layers.1.ffn_norm2", "full", {"diff": torch.randn(64, generator=g) * 0.1}),
        Target(
            "layers.0.adaLN_modulation.0", "full",
            {"diff": torch.randn(256, 64, generator=g) * 0.02, "diff_b": torch.randn(256, generator=g) * 0.02},
        ),
    ]
    return Adapter(name="norms", format="test", source="test", targets=targets)


# --- exact restore ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stacked_adapters_restore_bit_exact(tmp_path, dtype):
    model = examples.tiny_model(seed=1, dtype=dtype)
    files = {
        "lora": adapter_file(tmp_path, model, "kohya", seed=1),
        "lokr": adapter_file(tmp_path, model, "lycoris-lokr-factorized", seed=2),
        "loha": adapter_file(tmp_path, model, "lycoris-loha", seed=3),
        "dora": adapter_file(tmp_path, model, "peft-dora", seed=4),
        "full": adapter_file(tmp_path, model, "lycoris-full", seed=5),
    }
    pristine = Pristine(model)
    base = output(model, dtype)
    modes = {"lora": "merged", "lokr": "dynamic", "loha": "merged", "dora": "dynamic", "full": "merged"}
    for name, path in files.items():
        apply_adapter(model, path, name=name, mode=modes[name], scale=0.5)
    apply_adapter(model, _norm_adapter(model), mode="dynamic", scale=2.0)
    assert [a.name for a in list_adapters(model)] == [*files, "norms"]
    assert isinstance(model.layers[0].attention.to_q, AdapterLinear)
    stacked = output(model, dtype)
    assert not torch.allclose(stacked, base)
    set_adapter_scale(model, "lora", -1.5)
    set_adapter_scale(model, "lokr", 3.0)
    set_adapter_scale(model, "norms", -1.0)
    for name in ("loha", "norms", "lokr"):
        remove_adapter(model, name)
    assert [a.name for a in list_adapters(model)] == ["lora", "dora", "full"]
    remove_adapter(model)
    pristine.assert_same(model)
    assert torch.equal(output(model, dtype), base)
    assert list_adapters(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_removing_one_merged_adapter_equals_never_applying_it(tmp_path, dtype):
    model = examples.tiny_model(seed=2, dtype=dtype)
    a, b = adapter_file(tmp_path, model, "kohya", seed=1), adapter_file(tmp_path, model, "lycoris-loha", seed=2)
    apply_adapter(model, b, mode="merged", name="b", scale=0.7)
    only_b = {k: v.clone() for k, v in model.state_dict().items()}
    remove_adapter(model)
    apply_adapter(model, a, mode="merged", name="a")
    apply_adapter(model, b, mode="merged", name="b", scale=0.7)
    remove_adapter(model, "a")
    for key, value in model.state_dict().items():
        assert torch.equal(value, only_b[key]), key  # re-merged from the original: no subtraction drift


def test_merged_rounds_once_and_rescale_is_an_exact_remerge(tmp_path):
    model = examples.tiny_model(seed=3, dtype=torch.bfloat16)
    path = adapter_file(tmp_path, model, "ai-toolkit", seed=3)
    name = "layers.0.feed_forward.w1"
    w0 = model.get_submodule(name).weight.detach().clone()
    adapter = load_adapter(path, model)
    t = next(t for t in adapter.targets if t.module == name)
    expected = (w0.float() + 0.8 * t.scale * (t.tensors["up"].float() @ t.tensors["down"].float())).to(torch.bfloat16)
    apply_adapter(model, path, mode="merged", scale=0.3, name="x")
    set_adapter_scale(model, "x", 0.8)
    assert torch.equal(model.get_submodule(name).weight, expected)


def test_small_chunks_give_the_same_merge(tmp_path, monkeypatch):
    model = examples.tiny_model(seed=4)
    path = adapter_file(tmp_path, model, "lycoris-lokr", seed=4)
    apply_adapter(model, path, mode="merged")
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    remove_adapter(model)
    monkeypatch.setattr(merge, "CHUNK_ELEMENTS", 64 * 7)  # 7 rows per block: blocks straddle W1 rows
    apply_adapter(model, path, mode="merged")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, whole[key], rtol=1e-6, atol=1e-7)


# --- dynamic specifics ------------------------------------------------------------------------------

def test_dynamic_scale_zero_and_negative(tmp_path, tiny):
    path = adapter_file(tmp_path, tiny, "lycoris-lokr", seed=6)
    base = output(tiny)
    apply_adapter(tiny, path, name="k", scale=1.0)
    plus = output(tiny)
    set_adapter_scale(tiny, "k", 0.0)
    assert torch.equal(output(tiny), base)
    set_adapter_scale(tiny, "k", -1.0)
    minus = output(tiny)
    assert not torch.allclose(minus, base) and not torch.allclose(minus, plus)
    remove_adapter(tiny)
    apply_adapter(tiny, path, name="k", scale=-1.0, mode="merged")
    assert rel_err(minus, output(tiny), base) < TOL


def test_reapplying_a_name_replaces_it_and_hotswaps_in_place(tmp_path, tiny):
    first, second = adapter_file(tmp_path, tiny, "kohya", seed=1), adapter_file(tmp_path, tiny, "kohya", seed=2)
    apply_adapter(tiny, second, name="x", scale=0.6)
    want = output(tiny)
    remove_adapter(tiny)
    apply_adapter(tiny, first, name="x")
    slot = tiny.layers[0].attention.to_q.slots["s1"]
    ptr = slot.up.data_ptr()
    report = apply_adapter(tiny, second, name="x", scale=0.6)
    assert report.replaced and report.hotswapped
    assert tiny.layers[0].attention.to_q.slots["s1"] is slot and slot.up.data_ptr() == ptr
    assert torch.equal(output(tiny), want)
    # Different shapes: a full replacement, same result as a fresh apply.
    other = adapter_file(tmp_path, tiny, "lycoris-loha", seed=3)
    report = apply_adapter(tiny, other, name="x", mode="merged")
    assert report.replaced and not report.hotswapped
    assert [(a.name, a.mode) for a in list_adapters(tiny)] == [("x", "merged")]
    assert not isinstance(tiny.layers[0].attention.to_q, AdapterLinear)


@pytest.mark.parametrize("layout", ["kohya", "ai-toolkit-lokr"])
def test_hot_swap_never_writes_into_the_callers_adapter(tmp_path, tiny, layout):
    """A hot swap copies into the slot's buffers; an fp32 factor used as it is must not be shared with them."""
    files = [examples.make_adapter(layout, tmp_path / f"{n}.safetensors", tiny, seed=n) for n in (1, 2)]
    first = load_adapter(files[0], tiny, name="x")
    kept = {(i, k): v.clone() for i, t in enumerate(first.targets) for k, v in t.tensors.items()}
    apply_adapter(tiny, first, name="x")
    report = apply_adapter(tiny, files[1], name="x")
    assert report.hotswapped
    assert all(torch.equal(first.targets[i].tensors[k], v) for (i, k), v in kept.items())
    remove_adapter(tiny)


def test_fp32_compute_on_bf16_model_is_closer_to_fp32_reference(tmp_path):
    ref_model = examples.tiny_model(seed=5)
    model = examples.tiny_model(seed=5, dtype=torch.bfloat16)
    path = adapter_file(tmp_path, ref_model, "kohya", seed=5)
    linear = ref_model.layers[0].feed_forward.w1
    x = torch.randn(16, 64)
    apply_adapter(ref_model, path, name="x")
    ref = ref_model.layers[0].feed_forward.w1(x)
    apply_adapter(model, path, name="x")
    low = model.layers[0].feed_forward.w1(x.bfloat16()).float()
    apply_adapter(model, path, name="x", compute_dtype=torch.float32)
    high = model.layers[0].feed_forward.w1(x.bfloat16()).float()
    assert linear is ref_model.layers[0].feed_forward.w1.base_layer
    assert (high - ref).norm() <= (low - ref).norm()


# --- everything or nothing --------------------------------------------------------------------------

def test_bad_target_found_before_any_change(tmp_path, tiny):
    adapter = load_adapter(adapter_file(tmp_path, tiny, "kohya", seed=1), tiny)
    adapter.targets[-1].tensors["up"][0, 0] = math.nan
    pristine = Pristine(tiny)
    for mode in ("dynamic", "merged"):
        with pytest.raises(IncompatibleWeightsError, match="NaN"):
            apply_adapter(tiny, adapter, mode=mode)
        pristine.assert_same(tiny)
    wrong = Adapter("w", "test", "test", [Target("layers.0.attention.to_q", "lora",
                                                  {"down": torch.ones(2, 65), "up": torch.ones(64, 2)})])
    with pytest.raises(IncompatibleWeightsError, match="65 inputs"):
        apply_adapter(tiny, wrong)
    pristine.assert_same(tiny)


def _fail_after(n: int, fn):
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise RuntimeError("injected failure")
        return fn(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("where", ["merge", "wrap"])
def test_failure_mid_apply_restores_exactly(tmp_path, monkeypatch, dtype, where):
    model = examples.tiny_model(seed=6, dtype=dtype)
    first = adapter_file(tmp_path, model, "lycoris-loha", seed=1)
    second = adapter_file(tmp_path, model, "kohya", seed=2)
    apply_adapter(model, first, name="a", mode="merged")
    apply_adapter(model, _norm_adapter(model), mode="dynamic")
    apply_adapter(model, second, name="b", mode="dynamic")
    before = Pristine(model)
    out_before = output(model, dtype)
    if where == "merge":
        monkeypatch.setattr(merge, "_rebuild_plain", _fail_after(20, merge._rebuild_plain))
        mode = "merged"
    else:
        monkeypatch.setattr(Slot, "__init__", _fail_after(20, Slot.__init__))
        mode = "dynamic"
    third = adapter_file(tmp_path, model, "lycoris-lokr", seed=3)
    for name in ("c", "a", "b"):  # a new name, and replacing a merged and a dynamic one
        with pytest.raises(RuntimeError, match="injected"):
            apply_adapter(model, third, name=name, mode=mode)
        before.assert_same(model)
        assert torch.equal(output(model, dtype), out_before)
        assert [a.name for a in list_adapters(model)] == ["a", "norms", "b"]
    monkeypatch.undo()
    remove_adapter(model)


def test_unknown_names_and_bad_arguments(tmp_path, tiny):
    with pytest.raises(LoRAError):
        remove_adapter(tiny, "nope")
    with pytest.raises(LoRAError):
        set_adapter_scale(tiny, "nope", 1.0)
    path = adapter_file(tmp_path, tiny, "kohya")
    with pytest.raises(LoRAError):
        apply_adapter(tiny, path, mode="fused")
    with pytest.raises(LoRAError):
        apply_adapter(tiny, path, scale=float("nan"))
    assert remove_adapter(tiny) == []
    assert not hasattr(tiny, "_zimage_lora_state")


def test_strength_beyond_float32_is_refused_before_anything_changes(tmp_path):
    import zimage_lora as zl
    from zimage_lora import examples as ex

    model = ex.tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = ex.make_adapter("kohya", tmp_path / "k.safetensors", model)
    for mode in ("merged", "dynamic"):
        with pytest.raises(zl.InvalidFormatError, match="float32"):
            zl.apply_adapter(model, path, scale=1e39, mode=mode)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert zl.list_adapters(model) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_that_overflows_the_weight_dtype_is_refused_and_rolled_back(tmp_path, dtype):

    import zimage_lora as zl
    from zimage_lora import examples as ex

    model = ex.tiny_model(dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "big.safetensors"
    stems = ["layers.0.attention.to_q", "layers.1.feed_forward.w2"]
    tensors = {}
    for stem in stems:
        module = model.get_submodule(stem)
        tensors[f"diffusion_model.{stem}.lora_A.weight"] = torch.full((2, module.in_features), 100.0)
        tensors[f"diffusion_model.{stem}.lora_B.weight"] = torch.full((module.out_features, 2), 100.0)
    save_file(tensors, str(path))
    with pytest.raises(zl.IncompatibleWeightsError, match="non-finite"):
        zl.apply_adapter(model, path, scale=1e36, mode="merged")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert zl.list_adapters(model) == []
