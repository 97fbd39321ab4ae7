"""Scale rules per module: per-key alpha, PEFT config patterns and rsLoRA, diffusers and kohya metadata."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import load_adapter

Q, W1 = "layers.0.attention.to_q", "layers.1.feed_forward.w1"


def _pair(stem: str, out_f: int, in_f: int, r: int, down=".lora_A.weight", up=".lora_B.weight"):
    return {stem + down: torch.randn(r, in_f), stem + up: torch.randn(out_f, r)}


def _scales(adapter) -> dict[str, float]:
    return {t.module: t.scale for t in adapter.targets}


def test_peft_folder_rank_and_alpha_patterns_and_rslora(tmp_path, tiny):
    folder = tmp_path / "peft"
    folder.mkdir()
    sd = {**_pair("base_model.model." + Q, 64, 64, 4), **_pair("base_model.model." + W1, 170, 64, 8)}
    save_file(sd, str(folder / "adapter_model.safetensors"))
    cfg = {"r": 4, "lora_alpha": 8, "rank_pattern": {"feed_forward.w1": 8}, "alpha_pattern": {"w1": 2},
           "use_rslora": False, "target_modules": [Q, W1]}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    assert _scales(load_adapter(folder, tiny)) == {Q: 8 / 4, W1: 2 / 8}
    cfg["use_rslora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    s = _scales(load_adapter(folder, tiny))
    assert s[Q] == pytest.approx(8 / math.sqrt(4)) and s[W1] == pytest.approx(2 / math.sqrt(8))


def test_per_key_alpha_beats_metadata_and_can_be_bf16_scalar(tmp_path, tiny):
    sd = {**_pair("lora_unet_layers_0_attention_to_q", 64, 64, 4, ".lora_down.weight", ".lora_up.weight"),
          **_pair("lora_unet_layers_1_feed_forward_w1", 170, 64, 8, ".lora_down.weight", ".lora_up.weight")}
    sd["lora_unet_layers_0_attention_to_q.alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)
    path = tmp_path / "k.safetensors"
    save_file(sd, str(path), metadata={"ss_network_alpha": "16", "ss_network_dim": "8"})
    # to_q has its own alpha (1/4); w1 has none, so kohya's network alpha applies (16/8).
    assert _scales(load_adapter(path, tiny)) == {Q: 0.25, W1: 2.0}


def test_diffusers_metadata_alpha(tmp_path, tiny):
    sd = _pair("transformer." + Q, 64, 64, 4)
    path = tmp_path / "d.safetensors"
    meta = {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 2, "alpha_pattern": {}, "rank_pattern": {}})}
    save_file(sd, str(path), metadata=meta)
    assert _scales(load_adapter(path, tiny)) == {Q: 0.5}


def test_no_alpha_means_scale_one_and_zero_alpha_too(tmp_path, tiny):
    sd = _pair("diffusion_model." + Q, 64, 64, 4)
    path = tmp_path / "a.safetensors"
    save_file(sd, str(path))
    assert _scales(load_adapter(path, tiny)) == {Q: 1.0}
    sd["diffusion_model." + Q + ".alpha"] = torch.tensor(0.0)
    save_file(sd, str(path))
    assert _scales(load_adapter(path, tiny)) == {Q: 1.0}


def test_per_module_alpha_differs_across_modules(tmp_path, tiny):
    sd = {}
    for stem, r, a in (("lora_unet_layers_0_attention_to_q", 4, 4.0), ("lora_unet_layers_1_feed_forward_w1", 8, 2.0)):
        out_f = 64 if "to_q" in stem else 170
        sd |= _pair(stem, out_f, 64, r, ".lora_down.weight", ".lora_up.weight")
        sd[stem + ".alpha"] = torch.tensor(a)
    path = tmp_path / "k.safetensors"
    save_file(sd, str(path))
    assert _scales(load_adapter(path, tiny)) == {Q: 1.0, W1: 0.25}
