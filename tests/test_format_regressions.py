"""Regressions from real files: metadata alpha applied twice, an unused inf alpha refusing a file, the
VideoX-Fun prefix, inspect on a zero-match file, trainer data in files, and mixed fused/split stems."""

from __future__ import annotations

import json

import pytest
import torch
from _layout_builders import BUILDERS, Q
from safetensors.torch import save_file

from zimage_lora import load_adapter
from zimage_lora.cli import main
from zimage_lora.errors import IncompatibleWeightsError
from zimage_lora.inventory import meta_model
from zimage_lora.keys import ModuleIndex

D = 3840


@pytest.fixture(scope="module")
def turbo():
    return ModuleIndex(meta_model())


def _save(path, sd, meta=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=meta)
    return path


def _probe(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n))


def _built_file(tmp_path, name, turbo):
    b = BUILDERS[name](turbo, _probe)
    return _save(tmp_path / f"{name}.safetensors", b.tensors, b.metadata or None), b


def test_musubi_converted_file_is_not_scaled_twice_and_inspect_says_why(tmp_path, turbo, capsys):
    # convert_lora.py --target other: alpha already in the weights, ss_network_alpha=1 / dim 4 copied.
    path, _b = _built_file(tmp_path, "musubi-convert-other", turbo)
    adapter = load_adapter(path, turbo)
    assert {t.scale for t in adapter.targets} == {1.0}
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "musubi-tuner convert_lora.py" in info["format"] and "ai-toolkit" not in info["format"]
    assert any("'ss_network_alpha' = 1 was not applied to 4 module(s)" in n for n in info["notes"])


def test_kohya_metadata_alpha_applies_and_inspect_says_so(tmp_path, turbo, capsys):
    stem = "lora_unet_layers_0_attention_to_q"
    sd = {stem + ".lora_down.weight": torch.randn(4, D), stem + ".lora_up.weight": torch.randn(D, 4)}
    path = _save(tmp_path / "k.safetensors", sd, {"ss_network_alpha": "2", "ss_network_dim": "4"})
    assert [t.scale for t in load_adapter(path, turbo).targets] == [0.5]
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert any("comes from metadata 'ss_network_alpha' (alpha 2)" in n for n in info["notes"])
    assert info["scale_rules"] == {"alpha/rank (metadata 'ss_network_alpha')": 1}


def test_unused_inf_alpha_of_full_factor_lokr_loads(tmp_path, turbo):
    path, b = _built_file(tmp_path, "ai-toolkit-lokr-full-fp16", turbo)
    adapter = load_adapter(path, turbo)
    assert sorted(adapter.modules) == sorted(b.effects) and {t.scale for t in adapter.targets} == {1.0}


def test_inf_alpha_that_is_used_is_refused(tmp_path, turbo):
    stem = "diffusion_model.layers.0.attention.to_q"
    sd = {stem + ".lokr_w1": torch.randn(60, 60), stem + ".lokr_w2_a": torch.randn(64, 4),
          stem + ".lokr_w2_b": torch.randn(4, 64), stem + ".alpha": torch.tensor(float("inf")).half()}
    with pytest.raises(Exception, match="expected a finite number") as err:
        load_adapter(_save(tmp_path / "a.safetensors", sd), turbo)
    assert "alpha" in str(err.value) and stem in str(err.value)


def test_videox_fun_double_underscore_prefix(tmp_path, turbo):
    path, b = _built_file(tmp_path, "videox-fun", turbo)
    adapter = load_adapter(path, turbo)
    assert sorted(adapter.modules) == sorted(b.effects) and adapter.unmatched == []


def _zero_match_file(tmp_path):
    sd = {}
    for n in range(30):  # more keys than the table shows by default (40)
        te = f"text_encoders.qwen3_4b.transformer.model.layers.{n}.self_attn.q_proj"
        sd[te + ".lora_A.weight"], sd[te + ".lora_B.weight"] = torch.randn(4, 8), torch.randn(8, 4)
    sd["siglip_refiner.0.attention.to_q.lora_A.weight"] = torch.randn(4, 8)
    sd["siglip_refiner.0.attention.to_q.lora_B.weight"] = torch.randn(8, 4)
    sd["some_junk"] = torch.zeros(2)
    return _save(tmp_path / "te.safetensors", sd), sorted(sd)


def test_inspect_on_zero_match_file_lists_every_key_and_fails(tmp_path, capsys):
    path, keys = _zero_match_file(tmp_path)
    assert main(["inspect", str(path), "--json"]) == 1
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert sorted(u["key"] for u in info["unmatched"]) == keys
    reasons = {u["key"]: u["reason"] for u in info["unmatched"]}
    assert reasons["siglip_refiner.0.attention.to_q.lora_A.weight"].startswith("no such module")
    te = "text_encoders.qwen3_4b.transformer.model.layers.29.self_attn.q_proj.lora_B.weight"
    assert "text-encoder" in reasons[te]
    assert "no known adapter suffix" in reasons["some_junk"]
    assert "error:" in captured.err and "zimage-lora inspect" not in captured.err + captured.out

    assert main(["inspect", str(path)]) == 1
    captured = capsys.readouterr()
    assert all(k in captured.out for k in keys) and "more (use --json" not in captured.out
    assert "zimage-lora inspect" not in captured.err + captured.out


def test_apply_on_zero_match_file_points_to_inspect(tmp_path, turbo):
    path, _keys = _zero_match_file(tmp_path)
    with pytest.raises(IncompatibleWeightsError, match="zimage-lora inspect"):
        load_adapter(path, turbo)


@pytest.mark.parametrize("name", ["musubi-lokr-full", "musubi-lokr-lowrank-bf16-factor"])
def test_lokr_factor_is_ignored_trainer_data_even_in_strict_mode(tmp_path, turbo, name, capsys):
    path, _b = _built_file(tmp_path, name, turbo)
    adapter = load_adapter(path, turbo, strict=True)
    assert [u.key for u in adapter.ignored] == ["lokr_factor"] and adapter.unmatched == []
    assert main(["inspect", str(path)]) == 0
    assert "ignored: lokr_factor: trainer data" in capsys.readouterr().out


def test_inspect_shows_unused_alpha_dora_orientation_and_other_loaders(tmp_path, capsys):
    path, _b = _built_file(tmp_path, "ai-toolkit-lokr-full-fp16", ModuleIndex(meta_model()))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "unused (x2)" in out and "1e+10" not in out and "inf" not in out.replace("info", "")
    path, _b = _built_file(tmp_path, "onetrainer-comfy-dora-per-input", ModuleIndex(meta_model()))
    assert main(["inspect", str(path)]) == 0
    assert "DoRA (per input column)" in capsys.readouterr().out
    path, _b = _built_file(tmp_path, "musubi-lokr-full", ModuleIndex(meta_model()))
    assert main(["inspect", str(path)]) == 0
    assert "ComfyUI and diffusers use scale 1" in " ".join(capsys.readouterr().out.split())


def _qkv_and_to_q(tmp_path, q_copy: bool):
    """A mixed file: fused qkv for block 0 plus a split to_q for the same block."""
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, D, generator=g), torch.randn(3 * D, 4, generator=g)
    q_down, q_up = (down.clone(), up[:D].clone()) if q_copy else (torch.randn(4, D, generator=g),
                                                                 torch.randn(D, 4, generator=g))
    sd = {"lora_unet_layers_0_attention_qkv.lora_down.weight": down,
          "lora_unet_layers_0_attention_qkv.lora_up.weight": up,
          "lora_unet_layers_0_attention_to_q.lora_down.weight": q_down,
          "lora_unet_layers_0_attention_to_q.lora_up.weight": q_up}
    return _save(tmp_path / "mixed.safetensors", sd), (down, up, q_down, q_up)


@pytest.mark.parametrize("q_copy", [False, True], ids=["different", "copies"])
def test_mixed_fused_qkv_and_split_to_q_use_both_parts(tmp_path, turbo, q_copy):
    path, (down, up, q_down, q_up) = _qkv_and_to_q(tmp_path, q_copy)
    adapter = load_adapter(path, turbo)
    by_module = {t.module: t for t in adapter.targets}
    assert sorted(by_module) == sorted([Q, "layers.0.attention.to_k", "layers.0.attention.to_v"])
    # to_q from the split keys (the model's own spelling), to_k / to_v from the fused keys' row blocks.
    assert torch.equal(by_module[Q].tensors["down"], q_down) and torch.equal(by_module[Q].tensors["up"], q_up)
    assert torch.equal(by_module["layers.0.attention.to_k"].tensors["up"], up[D:2 * D])
    assert torch.equal(by_module["layers.0.attention.to_v"].tensors["up"], up[2 * D:])
    assert all(torch.equal(by_module[m].tensors["down"], down) for m in by_module if m != Q)
    assert adapter.unmatched == []
    assert any("overlap" in n and "to_q" in n and "to_k" in n for n in adapter.notes)
    # Whether the part given up was a copy is checked, and said when it is not.
    assert any("different delta" in n for n in adapter.notes) is (not q_copy)


@pytest.mark.parametrize("copy", [False, True], ids=["different", "copies"])
def test_two_spellings_of_one_module_say_whether_they_are_copies(tmp_path, turbo, copy):
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(4, D, generator=g), torch.randn(D, 4, generator=g)
    sd = {"lora_unet_layers_0_attention_to_out_0.lora_down.weight": down,
          "lora_unet_layers_0_attention_to_out_0.lora_up.weight": up,
          "lora_unet_layers_0_attention_out.lora_down.weight": down.clone() if copy else torch.randn(4, D, generator=g),
          "lora_unet_layers_0_attention_out.lora_up.weight": up.clone()}
    adapter = load_adapter(_save(tmp_path / "two.safetensors", sd), turbo)
    assert adapter.modules == ["layers.0.attention.to_out.0"]
    assert torch.equal(adapter.targets[0].tensors["down"], down)  # the model's own spelling wins
    reasons = {u.key: u.reason for u in adapter.unmatched}
    assert sorted(reasons) == ["lora_unet_layers_0_attention_out.lora_down.weight",
                               "lora_unet_layers_0_attention_out.lora_up.weight"]
    assert all(r.startswith("redundant") for r in reasons.values())
    assert all(("different delta" in r) is (not copy) for r in reasons.values())


def test_peft_metadata_alpha_does_not_scale_kohya_style_keys(tmp_path, turbo):
    # lora_adapter_metadata describes PEFT-named lora_A/lora_B factors; on lora_down keys it is not applied.
    stem = "lora_unet_layers_0_attention_to_q"
    sd = {stem + ".lora_down.weight": torch.randn(4, D), stem + ".lora_up.weight": torch.randn(D, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 1})}
    adapter = load_adapter(_save(tmp_path / "k.safetensors", sd, meta), turbo)
    assert [t.scale for t in adapter.targets] == [1.0]
    assert any("'lora_adapter_metadata' was not applied to 1 module(s)" in n for n in adapter.notes)


def test_musubi_full_lokr_converts_at_its_trained_strength(tmp_path, turbo):
    # Written layouts read full LoKr factors at scale 1: musubi's alpha / max(w2 shape) is folded into w2.
    from zimage_lora.tools.convert import convert_adapter

    path, b = _built_file(tmp_path, "musubi-lokr-full", turbo)
    for to in ("kohya", "comfy"):
        out = convert_adapter(load_adapter(path, turbo), to, tmp_path / f"{to}.safetensors")
        back = load_adapter(out, turbo)
        assert sorted(back.modules) == sorted(b.effects) and {t.scale for t in back.targets} == {1.0}
        for t in back.targets:
            w1, w2 = t.tensors["w1"].float(), t.tensors["w2"].float()
            got = torch.kron(w1, w2) @ _probe(w1.shape[1] * w2.shape[1])
            torch.testing.assert_close(got, b.effects[t.module], rtol=1e-4, atol=1e-4 * float(got.abs().max()))
