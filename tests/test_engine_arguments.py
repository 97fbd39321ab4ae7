"""Caller mistakes, dynamic overflow, fusing a disabled adapter, and derived names.

- Every argument mistake raises `InvalidArgumentError` (a `LoRAError` and a `ValueError`), before
  anything is read or changed.
- An adapter whose delta overflows the dtype it runs in is refused in dynamic mode as in merged mode.
- `fuse` / `unfuse` keep an adapter's active state: a disabled adapter stays disabled.
- A name derived from the file never silently replaces an adapter from another file.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _apply_util import output
from _hostile import assert_untouched, state_bits
from safetensors.torch import save_file

import zimage_lora as zl
from zimage_lora import (
    Adapters,
    InvalidArgumentError,
    apply_adapter,
    examples,
    list_adapters,
    load_adapter,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)

STEM = "layers.0.attention.to_q"


@pytest.fixture(scope="module")
def kohya(tmp_path_factory) -> Path:
    return examples.make_adapter("kohya", tmp_path_factory.mktemp("k") / "g.safetensors", examples.tiny_model(), seed=1)


def _hand_built(**target) -> zl.Adapter:
    module = examples.tiny_model().get_submodule(STEM)
    tensors = {"down": torch.randn(2, module.in_features), "up": torch.randn(module.out_features, 2)}
    fields = {"module": STEM, "algorithm": "lora", "tensors": tensors, **target}
    return zl.Adapter(name="hand", format="hand", source="", targets=[zl.Target(**fields)])


def _weights(model: torch.nn.Module) -> dict[str, tuple]:
    """Every parameter and buffer's bytes, and the module classes without the adapters' own slots
    (whose keys are numbered afresh when an adapter is attached again)."""
    return {k: v for k, v in state_bits(model).items() if ".slots." not in k}


def _dense(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t.to("meta") if kind == "meta" else t.to_sparse()


# --- item 11: argument mistakes --------------------------------------------------------------------
MISTAKES = {
    "weights-not-a-list": lambda m, p: set_active_adapters(m, ["g"], 0.5),
    "weights-too-few": lambda m, p: set_active_adapters(m, ["g"], []),
    "weight-not-a-number": lambda m, p: set_active_adapters(m, ["g"], ["strong"]),
    "weight-nan": lambda m, p: set_active_adapters(m, ["g"], [math.nan]),
    "names-a-number": lambda m, p: set_active_adapters(m, 5),
    "names-repeated": lambda m, p: set_active_adapters(m, ["g", "g"]),
    "scale-name-a-list": lambda m, p: set_adapter_scale(m, ["g"], 1),
    "scale-a-string": lambda m, p: set_adapter_scale(m, "g", "1.5"),
    "remove-name-a-list": lambda m, p: remove_adapter(m, ["g"]),
    "compute-dtype-string": lambda m, p: apply_adapter(m, p, name="h", compute_dtype="fp16"),
    "compute-dtype-int8": lambda m, p: apply_adapter(m, p, name="h", compute_dtype=torch.int8),
    "compute-dtype-float8": lambda m, p: apply_adapter(m, p, name="h", compute_dtype=torch.float8_e4m3fn),
    "path-5000-chars": lambda m, p: apply_adapter(m, "x" * 5000 + ".safetensors"),
    "load-path-5000-chars": lambda m, p: load_adapter("y" * 5000, m),
    "adapter-meta-tensors": lambda m, p: apply_adapter(
        m, _hand_built(tensors={k: _dense(v, "meta") for k, v in _hand_built().targets[0].tensors.items()})),
    "adapter-sparse-tensors": lambda m, p: apply_adapter(
        m, _hand_built(tensors={k: _dense(v, "sparse") for k, v in _hand_built().targets[0].tensors.items()})),
    "adapter-list-not-tensor": lambda m, p: apply_adapter(m, _hand_built(tensors={"down": [1.0], "up": [2.0]})),
    "target-scale-text": lambda m, p: apply_adapter(m, _hand_built(scale="strong")),
    "target-scale-nan": lambda m, p: apply_adapter(m, _hand_built(scale=math.nan), mode="merged"),
    "target-scale-overflow": lambda m, p: apply_adapter(m, _hand_built(scale=1e39)),
    "target-rows-text": lambda m, p: apply_adapter(m, _hand_built(rows=("0", "8"))),
    "config-scale-text": lambda m, p: apply_adapter(m, zl.LoRAConfiguration(p, scale="strong")),
    "targets-not-targets": lambda m, p: apply_adapter(
        m, zl.Adapter(name="x", format="x", source="", targets=[{"module": STEM}])),
    "handle-weights-text": lambda m, p: Adapters(m).set_adapters("g", "strong"),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_caller_mistakes_raise_invalid_argument_error_and_change_nothing(mistake, kohya):
    model = examples.tiny_model()
    apply_adapter(model, kohya, name="g", scale=0.5)
    before = state_bits(model)
    with pytest.raises(InvalidArgumentError) as info:
        MISTAKES[mistake](model, kohya)
    assert isinstance(info.value, zl.LoRAError) and isinstance(info.value, ValueError)
    assert_untouched(model, before)
    assert [(a.name, a.scale, a.active) for a in list_adapters(model)] == [("g", 0.5, True)]


def test_argument_errors_that_were_invalid_format_errors_still_are(kohya):
    model = examples.tiny_model()
    for call in (lambda: apply_adapter(model, kohya, scale=math.inf), lambda: apply_adapter(model, kohya, mode="x"),
                 lambda: apply_adapter(model, kohya, name=""), lambda: apply_adapter(object(), kohya)):
        with pytest.raises(InvalidArgumentError) as info:
            call()
        assert isinstance(info.value, zl.InvalidFormatError)  # handlers written before still catch it
    assert "InvalidArgumentError" in zl.__all__


def test_a_valid_compute_dtype_and_sequence_arguments_are_still_accepted(kohya):
    model = examples.tiny_model()
    apply_adapter(model, kohya, name="g", compute_dtype=torch.float64)
    set_active_adapters(model, "g", (0.25,))  # one name as a string, weights as a tuple
    assert [(a.name, a.scale) for a in list_adapters(model)] == [("g", 0.25)]
    Adapters(model).set_adapters(["g"], 0.75)  # the handle takes one number for all
    assert list_adapters(model)[0].scale == 0.75


# --- item 12: dynamic overflow, refused by merged mode's rule -------------------------------------------
def _huge(tmp_path: Path, model: torch.nn.Module, factor: float, alpha: float | None) -> Path:
    module = model.get_submodule(STEM)
    stem = f"lora_unet_{STEM.replace('.', '_')}"
    tensors = {f"{stem}.lora_down.weight": torch.full((2, module.in_features), factor),
               f"{stem}.lora_up.weight": torch.full((module.out_features, 2), factor)}
    if alpha is not None:
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(tmp_path / "huge.safetensors"))
    return tmp_path / "huge.safetensors"


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
@pytest.mark.parametrize(("factor", "alpha"), [(1e20, 3e38), (1e20, None)], ids=["alpha-3e38", "factors-1e20"])
def test_a_delta_that_overflows_is_refused_in_both_modes(tmp_path, mode, factor, alpha):
    model = examples.tiny_model()
    before = state_bits(model)
    path = _huge(tmp_path, model, factor, alpha)
    with pytest.raises(zl.IncompatibleWeightsError, match="non-finite|overflows"):
        apply_adapter(model, path, mode=mode)
    assert_untouched(model, before)
    assert list_adapters(model) == []


def test_fp16_overflow_is_refused_unless_computed_in_float32(tmp_path):
    """Factors of 300 give deltas of 180,000 (alpha = rank): finite in fp32, beyond float16's 65,504."""
    model = examples.tiny_model(dtype=torch.float16)
    before = state_bits(model)
    path = _huge(tmp_path, model, 300.0, 2.0)
    for mode in ("merged", "dynamic"):
        with pytest.raises(zl.IncompatibleWeightsError, match="float16"):
            apply_adapter(model, path, mode=mode)
        assert_untouched(model, before)
    report = apply_adapter(model, path, compute_dtype=torch.float32)
    assert report.applied == [STEM]


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_reweighting_into_overflow_is_refused_in_both_modes(tmp_path, mode):
    model = examples.tiny_model()
    apply_adapter(model, _huge(tmp_path, model, 10.0, None), name="g", mode=mode)  # deltas of 200
    ref = output(model)
    before = state_bits(model)
    for change in (lambda: set_adapter_scale(model, "g", 3e38), lambda: set_active_adapters(model, ["g"], [3e38])):
        with pytest.raises(zl.IncompatibleWeightsError):
            change()
        assert_untouched(model, before)
        assert list_adapters(model)[0].scale == 1.0
    set_adapter_scale(model, "g", 1e30)  # large but finite (deltas of 2e32): accepted
    set_adapter_scale(model, "g", 1.0)
    assert torch.allclose(output(model), ref, atol=1e-4)


# --- item 13: fuse keeps a disabled adapter disabled ---------------------------------------------------
def test_fuse_of_a_disabled_adapter_keeps_it_disabled(kohya):
    model = examples.tiny_model()
    pristine = state_bits(model)
    base = output(model)
    handle = Adapters(model)
    handle.load(kohya, "g", scale=0.8)
    on = output(model)
    handle.disable("g")
    handle.fuse("g")
    assert [(a.name, a.mode, a.active, a.scale) for a in handle.list()] == [("g", "merged", False, 0.8)]
    assert_untouched(model, pristine)  # disabled: nothing merged into any weight
    assert torch.equal(output(model), base)
    handle.enable("g")  # enabling merges it at its scale
    assert torch.allclose(output(model), on, atol=1e-5)
    handle.disable("g")
    handle.unfuse("g")
    assert [(a.mode, a.active) for a in handle.list()] == [("dynamic", False)]
    assert torch.equal(output(model), base)
    handle.enable("g")
    assert torch.allclose(output(model), on, atol=1e-5)


def test_fuse_of_several_is_all_or_nothing(kohya, tmp_path, monkeypatch):
    from zimage_lora.apply import engine

    model = examples.tiny_model()
    handle = Adapters(model)
    handle.load(kohya, "g")
    lokr = examples.make_adapter("lycoris-lokr", tmp_path / "h.safetensors", examples.tiny_model(), seed=3)
    handle.load(lokr, "h")
    before = _weights(model)
    ref = output(model)
    real_plan = engine.check_targets

    def plan(model, adapter, mode, **kwargs):
        if adapter.name == "h" and mode == "merged":
            raise RuntimeError("injected: the second fuse fails")
        return real_plan(model, adapter, mode, **kwargs)

    monkeypatch.setattr(engine, "check_targets", plan)
    with pytest.raises(RuntimeError, match="injected"):
        handle.fuse()  # "g" is fused first, then "h" fails: "g" goes back to dynamic
    assert [(a.name, a.mode) for a in handle.list()] == [("g", "dynamic"), ("h", "dynamic")]
    assert _weights(model) == before
    assert torch.equal(output(model), ref)
    with pytest.raises(zl.LoRAError, match="missing"):
        handle.fuse(["g", "missing"])  # an unknown name: refused before anything changes
    assert [a.mode for a in handle.list()] == ["dynamic", "dynamic"]


# --- issue 12 item 4: names never collide silently -------------------------------------------------
def test_a_derived_name_taken_by_another_file_gets_a_free_one(tmp_path):
    model = examples.tiny_model()
    first = examples.make_adapter("kohya", tmp_path / "one" / "adapter.safetensors", model, seed=1)
    second = examples.make_adapter("kohya", tmp_path / "two" / "adapter.safetensors", model, seed=2)
    r1 = apply_adapter(model, first)
    r2 = apply_adapter(model, second)
    assert (r1.name, r1.renamed_from, r1.replaced) == ("adapter", None, False)
    assert (r2.name, r2.renamed_from, r2.replaced) == ("adapter_2", "adapter", False)
    assert any("'adapter' is taken" in n and "adapter_2" in n for n in r2.notes)
    assert "adapter_2" in str(r2)
    assert [a.name for a in list_adapters(model)] == ["adapter", "adapter_2"]
    # The same file again replaces its own adapter (the one holding that source), not the other.
    r3 = apply_adapter(model, second, scale=0.5)
    assert (r3.name, r3.replaced) == ("adapter_2", True)
    assert [(a.name, a.scale) for a in list_adapters(model)] == [("adapter", 1.0), ("adapter_2", 0.5)]


def test_an_explicit_name_replaces_and_the_report_says_so(tmp_path):
    model = examples.tiny_model()
    first = examples.make_adapter("kohya", tmp_path / "one" / "adapter.safetensors", model, seed=1)
    second = examples.make_adapter("kohya", tmp_path / "two" / "adapter.safetensors", model, seed=2)
    assert apply_adapter(model, first, name="style").replaced is False
    report = apply_adapter(model, second, name="style")
    assert report.replaced and report.renamed_from is None
    assert any(n.startswith("replaced the attached adapter 'style'") and str(first) in n for n in report.notes)
    assert [(a.name, a.source) for a in list_adapters(model)] == [("style", str(second))]
    solo = examples.tiny_model()
    apply_adapter(solo, second)
    assert torch.allclose(output(model), output(solo), atol=1e-6)
