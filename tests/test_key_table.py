"""Real trainer keys, each asserted to land on its module of the full-size Z-Image-Turbo inventory.

The inventory is built on the meta device from the shipped config (276 Linear layers), so the table
checks resolution at the real names and shapes without any weights.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import load_adapter
from zimage_lora.inventory import meta_model
from zimage_lora.keys import ModuleIndex

D, FF, ADA = 3840, 10240, 256
SHAPES = {  # diffusers module -> (out, in)
    "layers.0.attention.to_q": (D, D),
    "layers.0.attention.to_k": (D, D),
    "layers.0.attention.to_v": (D, D),
    "layers.0.attention.to_out.0": (D, D),
    "layers.29.feed_forward.w2": (D, FF),
    "layers.7.feed_forward.w1": (FF, D),
    "layers.3.adaLN_modulation.0": (4 * D, ADA),
    "noise_refiner.1.adaLN_modulation.0": (4 * D, ADA),
    "context_refiner.0.feed_forward.w3": (FF, D),
    "all_x_embedder.2-1": (D, 64),
    "all_final_layer.2-1.linear": (64, D),
    "all_final_layer.2-1.adaLN_modulation.1": (D, ADA),
    "t_embedder.mlp.0": (1024, 256),
    "t_embedder.mlp.2": (256, 1024),
    "cap_embedder.1": (D, 2560),
}
QKV = ("layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v")

# (file stem as a trainer writes it, down suffix, up suffix, expected modules)
TABLE = [
    ("diffusion_model.layers.0.attention.to_q", ".lora_A.weight", ".lora_B.weight", ["layers.0.attention.to_q"]),
    ("transformer.layers.29.feed_forward.w2", ".lora_A.weight", ".lora_B.weight", ["layers.29.feed_forward.w2"]),
    ("lora_unet_layers_0_attention_to_out_0", ".lora_down.weight", ".lora_up.weight", ["layers.0.attention.to_out.0"]),
    ("lora_unet_layers_0_attention_out", ".lora_down.weight", ".lora_up.weight", ["layers.0.attention.to_out.0"]),
    ("lora_unet_layers_0_attention_qkv", ".lora_down.weight", ".lora_up.weight", list(QKV)),
    ("lora_unet_all_final_layer_2-1_adaLN_modulation_1", ".lora_down.weight", ".lora_up.weight",
     ["all_final_layer.2-1.adaLN_modulation.1"]),
    ("lora_unet_all_x_embedder_2-1", ".lora_down.weight", ".lora_up.weight", ["all_x_embedder.2-1"]),
    ("lora_unet_x_embedder", ".lora_down.weight", ".lora_up.weight", ["all_x_embedder.2-1"]),
    ("lora_unet_final_layer_linear", ".lora_down.weight", ".lora_up.weight", ["all_final_layer.2-1.linear"]),
    ("lora_unet_noise_refiner_1_adaLN_modulation_0", ".lora_down.weight", ".lora_up.weight",
     ["noise_refiner.1.adaLN_modulation.0"]),
    ("lora_unet_context_refiner_0_feed_forward_w3", ".lora_down.weight", ".lora_up.weight",
     ["context_refiner.0.feed_forward.w3"]),
    ("lora_unet_t_embedder_mlp_0", ".lora_down.weight", ".lora_up.weight", ["t_embedder.mlp.0"]),
    ("lora_unet_cap_embedder_1", ".lora_down.weight", ".lora_up.weight", ["cap_embedder.1"]),
    ("layers.7.feed_forward.w1", ".lora_A.default.weight", ".lora_B.default.weight", ["layers.7.feed_forward.w1"]),
    ("lycoris_layers_0_attention_to_v", ".lora_down.weight", ".lora_up.weight", ["layers.0.attention.to_v"]),
    ("diffusion_model.layers.0.attention.qkv", ".lora_A.weight", ".lora_B.weight", list(QKV)),
    ("diffusion_model.layers.0.attention.out", ".lora_A.weight", ".lora_B.weight", ["layers.0.attention.to_out.0"]),
    ("diffusion_model.x_embedder", ".lora_A.weight", ".lora_B.weight", ["all_x_embedder.2-1"]),
    ("diffusion_model.final_layer.linear", ".lora_A.weight", ".lora_B.weight", ["all_final_layer.2-1.linear"]),
    ("diffusion_model.final_layer.adaLN_modulation.1", ".lora_A.weight", ".lora_B.weight",
     ["all_final_layer.2-1.adaLN_modulation.1"]),
    ("transformer.layers.0.attention.to_q", ".lora_down.weight", ".lora_up.weight", ["layers.0.attention.to_q"]),
    ("base_model.model.layers.3.adaLN_modulation.0", ".lora_A.weight", ".lora_B.weight",
     ["layers.3.adaLN_modulation.0"]),
    ("lora_unet_layers_0_attention_to_k", ".lora.down.weight", ".lora.up.weight", ["layers.0.attention.to_k"]),
    ("transformer.t_embedder.mlp.2", ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight",
     ["t_embedder.mlp.2"]),
    ("diffusion_model.cap_embedder.1", "_lora.down.weight", "_lora.up.weight", ["cap_embedder.1"]),
    ("transformer.layers.0.attention.to_k", ".lora_A.weight", ".lora_B.default.weight", ["layers.0.attention.to_k"]),
    ("model.diffusion_model.layers.0.attention.to_v", ".lora_A.weight", ".lora_B.weight", ["layers.0.attention.to_v"]),
]


@pytest.fixture(scope="module")
def turbo_index():
    return ModuleIndex(meta_model())


def _shape(modules: list[str]) -> tuple[int, int]:
    return sum(SHAPES[m][0] for m in modules), SHAPES[modules[0]][1]


@pytest.mark.parametrize("stem,down,up,modules", TABLE, ids=[row[0] + row[1] for row in TABLE])
def test_trainer_key_lands_on_module(tmp_path, turbo_index, stem, down, up, modules):
    out_f, in_f = _shape(modules)
    rank = 2
    path = tmp_path / "a.safetensors"
    save_file({stem + down: torch.randn(rank, in_f), stem + up: torch.randn(out_f, rank)}, str(path))
    adapter = load_adapter(path, turbo_index)
    assert [t.module for t in adapter.targets] == modules
    assert adapter.unmatched == []
    # A fused qkv stem shares down and gives each of q, k, v its own row block of up.
    if len(modules) == 3:
        ups = [t.tensors["up"] for t in adapter.targets]
        assert all(u.shape == (D, rank) for u in ups)
        assert not torch.equal(ups[0], ups[1])


def test_turbo_inventory_has_276_linears(turbo_index):
    assert len(turbo_index.linear_names()) == 276


@pytest.mark.parametrize(
    "stem",
    ["lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder.layers.0.mlp.fc1", "lora_te1_encoder_q_proj"],
)
def test_text_encoder_keys_are_reported_not_applied(tmp_path, turbo_index, stem):
    path = tmp_path / "a.safetensors"
    save_file(
        {
            stem + ".lora_down.weight": torch.randn(2, 16),
            stem + ".lora_up.weight": torch.randn(16, 2),
            "lora_unet_layers_0_attention_to_q.lora_down.weight": torch.randn(2, D),
            "lora_unet_layers_0_attention_to_q.lora_up.weight": torch.randn(D, 2),
        },
        str(path),
    )
    adapter = load_adapter(path, turbo_index)
    assert adapter.modules == ["layers.0.attention.to_q"]
    assert {u.key for u in adapter.unmatched} == {stem + ".lora_down.weight", stem + ".lora_up.weight"}
    assert all("text-encoder" in u.reason for u in adapter.unmatched)
