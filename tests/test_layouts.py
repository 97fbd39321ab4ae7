"""layouts/: every row writes the keys its trainer writes (stated literally here, from the trainers'
saving code as in docs/formats.md), and what a row writes reads back as the same adapter.

The expected keys are written out by hand, not derived from the tables: a wrong table row fails here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _deltas import resolved_deltas
from safetensors import safe_open

from zimage_lora import load_adapter
from zimage_lora.formats import grammar
from zimage_lora.layouts import LAYOUTS, PREFIXES, Item, write

OUT = "layers.0.attention.to_out.0"
R, ALPHA = 4, 2.0
_LORA = (".lora_down.weight", ".lora_up.weight")
_PEFT = (".lora_A.weight", ".lora_B.weight")

# layout -> (stem, (down, up) suffixes, alpha key written, metadata written)
LORA_KEYS = {
    "kohya": ("lora_unet_layers_0_attention_to_out_0", _LORA, True, {}),
    "kohya-fused": ("lora_unet_layers_0_attention_out", _LORA, True, {}),  # musubi's to_out_0 -> out
    "kohya-dotted": ("lora_unet_layers_0_attention_to_out_0", (".lora.down.weight", ".lora.up.weight"), True, {}),
    "videox-fun": ("lora_unet__layers_0_attention_to_out_0", _LORA, True, {}),
    "lycoris": ("lycoris_layers_0_attention_to_out_0", _LORA, True, {"ss_network_module": "lycoris.kohya"}),
    "comfy": ("diffusion_model.layers.0.attention.out", _PEFT, True, {}),
    "ai-toolkit": ("diffusion_model.layers.0.attention.to_out.0", _PEFT, False, {}),
    "musubi-other": ("diffusion_model.layers.0.attention.to_out.0", _PEFT, False, {}),
    "diffsynth": ("layers.0.attention.to_out.0", (".lora_A.default.weight", ".lora_B.default.weight"), False, {}),
    "onetrainer-legacy": ("transformer.layers.0.attention.to_out.0", _LORA, True, {}),
    "onetrainer-original": ("layers.0.attention.to_out.0", _PEFT, True, {}),
    "onetrainer-comfy": ("diffusion_model.layers.0.attention.to_out.0", _PEFT, True, {}),
    "diffusers": ("transformer.layers.0.attention.to_out.0", _PEFT, False, {"format": "pt"}),
    "peft": ("base_model.model.layers.0.attention.to_out.0", _PEFT, False, {}),
}


def _lora_item(model, name=OUT, seed=0) -> Item:
    m = model.get_submodule(name)
    g = torch.Generator().manual_seed(seed)
    t = {"down": torch.randn(R, m.in_features, generator=g), "up": torch.randn(m.out_features, R, generator=g)}
    return Item(name, "lora", t, ALPHA / R, R)


def _read(path):
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    with safe_open(str(file), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


def test_every_lora_row_is_stated():
    assert sorted(LORA_KEYS) == sorted(n for n, x in LAYOUTS.items() if "lora" in x.suffixes)


@pytest.mark.parametrize("name", sorted(LORA_KEYS))
def test_row_writes_the_trainers_keys_and_reads_back(tmp_path, tiny, name):
    stem, (down, up), alpha_key, metadata = LORA_KEYS[name]
    item = _lora_item(tiny)
    path = write.save([item], name, tmp_path / (name if LAYOUTS[name].folder else f"{name}.safetensors"))
    sd, meta = _read(path)
    assert set(sd) == {stem + down, stem + up} | ({stem + ".alpha"} if alpha_key else set())
    assert all(meta.get(k) == v for k, v in metadata.items())
    if alpha_key:
        assert sd[stem + ".alpha"].item() == ALPHA
    if name == "musubi-other":  # convert_lora.py: sqrt(alpha / rank) multiplied into each factor
        k = math.sqrt(ALPHA / R)
        torch.testing.assert_close(sd[stem + down], item.tensors["down"] * k)
    # Read back: the same module and the same scaled delta (alpha from wherever the row keeps it; where it
    # keeps none, the scale went into up).
    adapter = load_adapter(path, tiny)
    assert adapter.modules == [OUT] and adapter.unmatched == []
    want = ALPHA / R * (item.tensors["up"] @ item.tensors["down"])
    torch.testing.assert_close(resolved_deltas(adapter, tiny)[OUT], want, rtol=1e-5, atol=1e-5)


def test_peft_rows_keep_alpha_in_config_or_metadata(tmp_path, tiny):
    folder = write.save([_lora_item(tiny)], "peft", tmp_path / "p")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == ("LORA", 4, 2, [OUT])
    _sd, meta = _read(write.save([_lora_item(tiny)], "diffusers", tmp_path / "d.safetensors"))
    assert json.loads(meta["lora_adapter_metadata"])["lora_alpha"] == 2


def test_lycoris_families_keep_their_suffixes(tmp_path, tiny):
    w1, w2a, w2b = torch.randn(2, 2), torch.randn(32, 1), torch.randn(1, 32)
    lokr = Item(OUT, "lokr", {"w1": w1, "w2_a": w2a, "w2_b": w2b}, 1.0, 1)
    hada = {r: torch.randn(170, 2) if r.endswith("_a") else torch.randn(2, 64)
            for r in ("w1_a", "w1_b", "w2_a", "w2_b")}
    loha = Item("layers.0.feed_forward.w1", "loha", hada, 0.5, 2)
    full = Item("layers.1.feed_forward.w2", "full", {"diff": torch.randn(64, 170)})
    for name, prefix, flat in (("kohya", "lora_unet_", True), ("lycoris", "lycoris_", True),
                               ("comfy", "diffusion_model.", False), ("ai-toolkit-lycoris", "diffusion_model.", False)):
        sd, _meta = _read(write.save([lokr, loha, full], name, tmp_path / f"{name}.safetensors"))
        out = "layers_0_attention_to_out_0" if flat else ("layers.0.attention.out" if name == "comfy" else OUT)
        w1_ = "layers_0_feed_forward_w1" if flat else "layers.0.feed_forward.w1"
        k = "layers_1_feed_forward_w2" if flat else "layers.1.feed_forward.w2"
        assert set(sd) == {
            *(prefix + out + s for s in (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b", ".alpha")),
            *(prefix + w1_ + s for s in (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".alpha")),
            prefix + k + ".diff",
        }, name
        adapter = load_adapter(tmp_path / f"{name}.safetensors", tiny)
        assert sorted((t.module, t.algorithm) for t in adapter.targets) == [
            ("layers.0.attention.to_out.0", "lokr"), ("layers.0.feed_forward.w1", "loha"),
            ("layers.1.feed_forward.w2", "full")]


def test_fused_rows_write_one_qkv(tmp_path, tiny):
    q, k, v = (_lora_item(tiny, f"layers.0.attention.to_{p}", seed=i) for i, p in enumerate("qkv"))
    k.tensors["down"] = v.tensors["down"] = q.tensors["down"]  # trained on the fused qkv: one down
    sd, _ = _read(write.save([q, k, v], "comfy", tmp_path / "c.safetensors"))
    assert set(sd) == {"diffusion_model.layers.0.attention.qkv" + s for s in (*_PEFT, ".alpha")}
    assert sd["diffusion_model.layers.0.attention.qkv.lora_B.weight"].shape == (192, R)
    sd, _ = _read(write.save([q, k, v], "kohya", tmp_path / "k.safetensors"))  # kohya keeps them split
    assert {s.split(".")[0] for s in sd} == {f"lora_unet_layers_0_attention_to_{p}" for p in "qkv"}


def test_what_a_row_cannot_hold_is_refused(tiny):
    lokr = Item(OUT, "lokr", {"w1": torch.randn(2, 2), "w2": torch.randn(32, 32)}, source_keys=("x.lokr_w1",))
    with pytest.raises(Exception, match="holds LoRA and DoRA only .*x.lokr_w1"):
        write.state_dict([lokr], "peft")


def test_prefixes_are_read_longest_first_and_every_written_prefix_is_read():
    order = list(PREFIXES)
    assert not [(a, b) for i, a in enumerate(order) for b in order[i + 1:] if b.startswith(a)]
    assert {x.prefix for x in LAYOUTS.values() if x.prefix} <= set(PREFIXES)


def test_every_written_spelling_parses_to_its_role():
    for layout in LAYOUTS.values():
        for family, roles in layout.suffixes.items():
            for role in roles:
                key = "layers.0.attention.to_q" + write.suffix(layout, family, role)
                assert grammar.split_role(key) == ("layers.0.attention.to_q", family, role), (layout.name, key)

