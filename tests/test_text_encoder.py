"""Text-encoder adapters on a pipeline's Qwen3 text encoder, cross-checked against PEFT.

The tiny pipeline's text encoder is a `Qwen3Model` built offline (the class Z-Image pipelines load).
PEFT gets the same factors, injected into a deep copy of the same text encoder.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from _apply_util import Pristine, output
from _pipeline_files import (
    SPELLINGS,
    TE_TARGETS,
    TR_ALPHA,
    TR_TARGETS,
    factors,
    patched,
    te_output,
    te_scale,
    token_inputs,
    write,
)
from _tiny_pipeline import tiny_pipeline
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

from zimage_lora import (
    Adapters,
    IncompatibleWeightsError,
    LoRAError,
    apply_adapter,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)
from zimage_lora.apply.engine import attached

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5


@pytest.fixture
def pipe():
    return tiny_pipeline(seed=0)


def _files(tmp_path, pipe, spelling, seed=0, te=True, tr=True):
    te_f = factors(pipe.text_encoder, TE_TARGETS, seed) if te else None
    tr_f = factors(pipe.transformer, TR_TARGETS, seed + 100) if tr else None
    return write(tmp_path / f"{spelling}_{seed}.safetensors", spelling, te_f, tr_f), te_f, tr_f


def _peft(te: torch.nn.Module, te_f: dict, alpha_over_rank: float, strength: float) -> torch.nn.Module:
    ref = copy.deepcopy(te)
    config = LoraConfig(r=4, lora_alpha=alpha_over_rank * 4, target_modules=list(te_f), lora_dropout=0.0)
    inject_adapter_in_model(config, ref)
    with torch.no_grad():
        for name, (down, up) in te_f.items():
            layer = ref.get_submodule(name)
            layer.lora_A["default"].weight.copy_(down)
            layer.lora_B["default"].weight.copy_(up * strength)  # the delta is linear in up
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> float:
    effect = float((b - base).norm())
    assert effect > 1e-3, "the adapter must visibly change the output"
    return float((a - b).norm()) / effect


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_text_encoder_part_matches_peft_and_restores_exactly(tmp_path, pipe, spelling, mode):
    path, te_f, _ = _files(tmp_path, pipe, spelling)
    inputs = token_inputs(pipe.text_encoder.config.vocab_size)
    te_base, tr_base = te_output(pipe.text_encoder, inputs), output(pipe.transformer)
    te_pristine, tr_pristine = Pristine(pipe.text_encoder), Pristine(pipe.transformer)
    alone = copy.deepcopy(pipe.transformer)  # the same file on the transformer alone: its part only
    apply_adapter(alone, path, mode=mode, scale=0.7)
    ref = _peft(pipe.text_encoder, te_f, te_scale(spelling), 0.7)

    report = apply_adapter(pipe, path, mode=mode, scale=0.7)

    assert set(report.parts) == {"transformer", "text_encoder"}
    assert report.applied == list(TR_TARGETS) + ["text_encoder." + n for n in TE_TARGETS]
    assert report.unmatched == []
    assert sorted(report.parts["text_encoder"].applied) == sorted(TE_TARGETS)
    assert _rel(te_output(pipe.text_encoder, inputs), te_output(ref, inputs), te_base) < TOL
    assert torch.equal(output(pipe.transformer), output(alone))
    assert not torch.equal(output(pipe.transformer), tr_base)
    assert [a.components for a in list_adapters(pipe)] == [("transformer", "text_encoder")]

    assert remove_adapter(pipe, path.stem) == [path.stem]
    te_pristine.assert_same(pipe.text_encoder)
    tr_pristine.assert_same(pipe.transformer)


def test_transformer_alone_reports_text_encoder_keys(tmp_path, pipe):
    path, _, _ = _files(tmp_path, pipe, "kohya")
    te_pristine = Pristine(pipe.text_encoder)
    report = apply_adapter(pipe.transformer, path)
    assert report.modules == list(TR_TARGETS)
    te_keys = [u for u in report.unmatched if u.key.startswith("lora_te_")]
    assert len(te_keys) == 3 * len(TE_TARGETS) == len(report.unmatched)
    assert all(u.reason.startswith("text-encoder key: only the transformer was given") for u in te_keys)
    te_pristine.assert_same(pipe.text_encoder)
    # A pipeline without a text encoder is the same case.
    bare = types.SimpleNamespace(transformer=copy.deepcopy(pipe.transformer), text_encoder=None)
    assert {u.key for u in apply_adapter(bare, path).unmatched} == {u.key for u in te_keys}


def test_text_encoder_only_file_leaves_the_transformer_alone(tmp_path, pipe):
    path, te_f, _ = _files(tmp_path, pipe, "diffusers", tr=False)
    tr_pristine = Pristine(pipe.transformer)
    inputs = token_inputs(pipe.text_encoder.config.vocab_size)
    base_te = copy.deepcopy(pipe.text_encoder)
    report = apply_adapter(pipe, path, mode="merged")
    assert set(report.parts) == {"text_encoder"}
    assert report.modules == ["text_encoder." + n for n in TE_TARGETS]
    assert report.format == "diffusers (text encoder)"
    tr_pristine.assert_same(pipe.transformer)
    ref = _peft(base_te, te_f, te_scale("diffusers"), 1.0)
    assert _rel(te_output(pipe.text_encoder, inputs), te_output(ref, inputs), te_output(base_te, inputs)) < TOL
    remove_adapter(pipe)
    assert list_adapters(pipe) == []


def test_stacking_scales_and_switching_over_both_components(tmp_path, pipe):
    a, te_a, _ = _files(tmp_path, pipe, "kohya", seed=1)
    b, te_b, _ = _files(tmp_path, pipe, "comfyui", seed=2, tr=False)
    inputs = token_inputs(pipe.text_encoder.config.vocab_size)
    te_output(pipe.text_encoder, inputs)  # transformers marks the model on its first forward: not ours
    te_pristine, tr_pristine = Pristine(pipe.text_encoder), Pristine(pipe.transformer)
    base_te = copy.deepcopy(pipe.text_encoder)
    apply_adapter(pipe, a, name="a", scale=0.5)
    apply_adapter(pipe, b, name="b", mode="merged", scale=2.0)
    assert [(i.name, i.components) for i in list_adapters(pipe)] == [
        ("a", ("transformer", "text_encoder")), ("b", ("text_encoder",)),
    ]

    def expect(sa: float, sb: float) -> torch.Tensor:
        deltas = [(n, f, sa * te_scale("kohya")) for n, f in te_a.items()]
        deltas += [(n, f, sb * te_scale("comfyui")) for n, f in te_b.items()]
        return te_output(patched(base_te, deltas), inputs)

    assert torch.allclose(te_output(pipe.text_encoder, inputs), expect(0.5, 2.0), atol=TOL, rtol=0)
    set_adapter_scale(pipe, "a", -1.5)
    assert torch.allclose(te_output(pipe.text_encoder, inputs), expect(-1.5, 2.0), atol=TOL, rtol=0)
    assert all(i.scale == -1.5 for i in list_adapters(pipe.transformer))
    set_active_adapters(pipe, ["b"], [3.0])
    assert torch.allclose(te_output(pipe.text_encoder, inputs), expect(0.0, 3.0), atol=TOL, rtol=0)
    assert [i.active for i in list_adapters(pipe.transformer)] == [False]
    handle = Adapters(pipe)
    with handle.disabled():
        assert torch.allclose(te_output(pipe.text_encoder, inputs), te_output(base_te, inputs), atol=TOL, rtol=0)
    handle.enable("a")
    handle.fuse("a")
    assert [(i.name, i.mode) for i in handle.list()] == [("a", "merged"), ("b", "merged")]
    assert torch.allclose(te_output(pipe.text_encoder, inputs), expect(-1.5, 3.0), atol=TOL, rtol=0)
    handle.unfuse()
    assert {i.mode for i in list_adapters(pipe.text_encoder)} == {"dynamic"}
    with pytest.raises(LoRAError, match="no adapter named 'c'"):
        set_adapter_scale(pipe, "c", 1.0)
    handle.unload("a")
    assert handle.names == ["b"] and list_adapters(pipe.transformer) == []
    handle.unload()
    te_pristine.assert_same(pipe.text_encoder)
    tr_pristine.assert_same(pipe.transformer)


def test_same_name_replaces_both_parts(tmp_path, pipe):
    both, _, _ = _files(tmp_path, pipe, "kohya", seed=1)
    tr_only, _, _ = _files(tmp_path, pipe, "kohya", seed=2, te=False)
    te_pristine = Pristine(pipe.text_encoder)
    apply_adapter(pipe, both, name="x")
    report = apply_adapter(pipe, tr_only, name="x")
    assert report.replaced and set(report.parts) == {"transformer"}
    te_pristine.assert_same(pipe.text_encoder)  # the older text-encoder part went with the name
    assert [i.components for i in list_adapters(pipe)] == [("transformer",)]


def test_unknown_text_encoder_module_is_reported_or_strict(tmp_path, pipe):
    te_f = factors(pipe.text_encoder, TE_TARGETS[:1], 0)
    down, up = te_f[TE_TARGETS[0]]
    sd = {
        "text_encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
        "text_encoder.layers.0.self_attn.q_proj.lora_B.weight": up,
        "text_encoder.layers.7.self_attn.q_proj.lora_A.weight": down.clone(),
        "text_encoder.layers.7.self_attn.q_proj.lora_B.weight": up.clone(),
    }
    path = tmp_path / "odd.safetensors"
    save_file(sd, str(path))
    te_pristine = Pristine(pipe.text_encoder)
    with pytest.raises(IncompatibleWeightsError, match="strict mode.*layers.7"):
        apply_adapter(pipe, path, strict=True)
    te_pristine.assert_same(pipe.text_encoder)
    report = apply_adapter(pipe, path)
    assert report.modules == ["text_encoder.layers.0.self_attn.q_proj"]
    assert {u.key for u in report.unmatched} == {k for k in sd if ".7." in k}
    assert all("no such module 'layers.7.self_attn.q_proj'" in u.reason for u in report.unmatched)


def test_a_refused_text_encoder_part_leaves_both_components_as_they_were(tmp_path, pipe):
    path, te_f, tr_f = _files(tmp_path, pipe, "kohya")
    te_f[TE_TARGETS[0]][1][0, 0] = float("nan")  # the text-encoder part only
    write(path, "kohya", te_f, tr_f)
    apply_adapter(pipe, _files(tmp_path, pipe, "kohya", seed=5)[0], name="kept")
    te_pristine, tr_pristine = Pristine(pipe.text_encoder), Pristine(pipe.transformer)
    with pytest.raises(IncompatibleWeightsError, match="NaN"):
        apply_adapter(pipe, path, name="kept", mode="merged")
    te_pristine.assert_same(pipe.text_encoder)
    tr_pristine.assert_same(pipe.transformer)
    assert [(i.name, i.mode) for i in list_adapters(pipe)] == [("kept", "dynamic")]


def test_a_file_matching_nothing_in_the_pipeline_is_an_error(tmp_path, pipe):
    path = tmp_path / "none.safetensors"
    sd = {"text_encoder.nope.lora_A.weight": torch.zeros(4, 8), "text_encoder.nope.lora_B.weight": torch.zeros(8, 4)}
    save_file(sd, str(path))
    with pytest.raises(IncompatibleWeightsError, match="no key matches a module of the pipeline.*nope"):
        apply_adapter(pipe, path)
    assert list_adapters(pipe) == []


def test_transformer_alpha_is_the_transformer_s(tmp_path, pipe):
    """diffusers packs alpha per component in one metadata entry: each part reads its own."""
    path, _, _ = _files(tmp_path, pipe, "diffusers")
    report = apply_adapter(pipe, path)

    tr_scales = {t.scale for t in attached(pipe.transformer, path.stem).adapter.targets}
    te_scales = {t.scale for t in attached(pipe.text_encoder, path.stem).adapter.targets}
    assert tr_scales == {TR_ALPHA / 4} and te_scales == {te_scale("diffusers")}
    assert report.format == "diffusers + diffusers (text encoder)"


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_lands_on_a_causal_lm_text_encoder_too(tmp_path, pipe, spelling):
    """A text encoder loaded as Qwen3ForCausalLM names its layers `model.layers.N`: same targets."""
    from transformers import Qwen3ForCausalLM

    causal = Qwen3ForCausalLM(pipe.text_encoder.config).eval()
    causal.model.load_state_dict(pipe.text_encoder.state_dict())
    host = types.SimpleNamespace(transformer=pipe.transformer, text_encoder=causal)
    path, te_f, _ = _files(tmp_path, pipe, spelling)
    ref = _peft(causal, {"model." + n: f for n, f in te_f.items()}, te_scale(spelling), 1.0)
    inputs = token_inputs(causal.config.vocab_size)
    base = te_output(causal, inputs)
    report = apply_adapter(host, path, mode="merged")
    assert report.parts["text_encoder"].modules == ["model." + n for n in TE_TARGETS]
    assert _rel(te_output(causal, inputs), te_output(ref, inputs), base) < TOL


@pytest.mark.parametrize("prior", ["none", "inactive", "hotswapped"])
def test_a_text_encoder_failure_after_the_transformer_changed_puts_the_transformer_back(
    tmp_path, pipe, monkeypatch, prior
):
    """Past validation the text encoder's apply can still fail (memory): the transformer part is undone,
    back to no adapter or to the same-named one it replaced (also when it was swapped in place)."""
    from zimage_lora.apply import attach as attaching

    old, _, _ = _files(tmp_path, pipe, "kohya", seed=1)
    new, _, _ = _files(tmp_path, pipe, "kohya", seed=2)
    if prior != "none":
        apply_adapter(pipe, old, name="x", scale=0.5)
    if prior == "inactive":
        set_active_adapters(pipe, [])
    tr_before, te_before = output(pipe.transformer), Pristine(pipe.text_encoder)
    tr_pristine = Pristine(pipe.transformer)
    listed = list_adapters(pipe)
    real = attaching.attach

    def failing(txn, adapter, *args, **kwargs):
        if txn.model is pipe.text_encoder:
            raise MemoryError("out of memory")
        return real(txn, adapter, *args, **kwargs)

    monkeypatch.setattr(attaching, "attach", failing)
    with pytest.raises(MemoryError):
        apply_adapter(pipe, new, name="x", mode="dynamic" if prior == "hotswapped" else "merged")
    monkeypatch.undo()
    te_before.assert_same(pipe.text_encoder)
    assert list_adapters(pipe) == listed
    if prior != "none":
        assert torch.equal(output(pipe.transformer), tr_before)
    else:
        tr_pristine.assert_same(pipe.transformer)
