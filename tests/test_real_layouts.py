"""Real trainer layouts at full Z-Image-Turbo shapes (meta-device inventory, rank 4).

Each row rebuilds what one trainer's saving code writes (provenance in the row's comment: repository,
file, function) and states what must happen: the modules it lands on, the strength of every target,
what is reported unmatched and why, what is ignored as trainer data, and the writer `inspect` names.

Strength is checked twice: the target's `scale` against the trainer's rule, and the target's effect
on a probe vector against the delta the trainer trained, computed here from the raw factors with
the trainer's own formula (not with the library's reader).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from _layout_base import base_weight
from _layout_builders import BUILDERS, Built
from safetensors.torch import save_file

from zimage_lora import algorithms, load_adapter
from zimage_lora.inventory import meta_model
from zimage_lora.keys import ModuleIndex
from zimage_lora.summary import summarize


@dataclass
class Row:
    name: str
    label: str  # substring of the `format` inspect shows
    unmatched: dict[str, str] = field(default_factory=dict)  # key -> substring of its reason
    ignored: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # substrings that must appear in the notes
    dora: str | None = None  # expected DoRA orientation


# One row per layout; the builders (with provenance) are in _layouts_kohya.py and _layouts_other.py under the same name.
TE = "text-encoder"
ROWS = [
    Row("ai-toolkit-lora", "ai-toolkit"),
    Row("ai-toolkit-lokr-full-fp16", "ai-toolkit (lycoris)", notes=("is unused",)),
    Row("ai-toolkit-lokr-lowrank", "ai-toolkit (lycoris)"),
    Row("musubi-lora", "musubi-tuner"),
    Row("musubi-convert-other", "musubi-tuner convert_lora.py --target other",
        notes=("'ss_network_alpha' = 1 was not applied",)),
    Row("musubi-convert-other-noprefix", "musubi-tuner convert_lora.py --target other",
        notes=("'ss_network_alpha' = 8 was not applied",)),
    Row("musubi-comfy-export", "musubi-tuner comfyui export (fused qkv)"),
    Row("musubi-comfy-export-loha", "musubi-tuner comfyui export (fused qkv)"),
    Row("musubi-lokr-full", "musubi-tuner lokr", ignored=("lokr_factor",),
        notes=("musubi-tuner's rule", "ComfyUI and diffusers use scale 1")),
    Row("musubi-lokr-full-0b2d692", "musubi-tuner lokr", notes=("musubi-tuner's rule (networks/lokr.py, commit 0b2d692",
                                                                "would apply alpha / max(lokr_w2 shape) = 1.06667")),
    Row("musubi-lokr-lowrank-bf16-factor", "musubi-tuner lokr", ignored=("lokr_factor",)),
    Row("videox-fun", "videox-fun"),
    Row("videox-fun-peft-export", "videox-fun"),
    Row("onetrainer-diffusers", "onetrainer (diffusers)"),
    Row("onetrainer-legacy", "onetrainer (legacy)"),
    Row("onetrainer-original", "onetrainer (original)"),
    Row("onetrainer-comfy-dora-per-input", "onetrainer (comfy)", dora="per input column"),
    Row("onetrainer-kohya", "onetrainer (kohya)"),
    Row("onetrainer-oft-scaled", "onetrainer (diffusers)"),
    Row("diffusion-pipe-lora", "diffusion-pipe (PEFT on ComfyUI's names, fused qkv)"),
    Row("diffusion-pipe-lokr", "diffusion-pipe (PEFT on ComfyUI's names, fused qkv)"),
    Row("musubi-convert-other-loha", "musubi-tuner convert_lora.py --target other"),
    Row("musubi-convert-other-lokr", "musubi-tuner convert_lora.py --target other",
        notes=("musubi-tuner's rule (networks/lokr.py, commit 0b2d692",)),
    Row("diffsynth", "diffsynth"),
    Row("diffsynth-omni-on-turbo", "diffsynth", unmatched={
        "siglip_refiner.0.attention.to_q.lora_A.default.weight": "no such module",
        "siglip_refiner.0.attention.to_q.lora_B.default.weight": "no such module"}),
    Row("simpletuner-lycoris-lokr", "lycoris", notes=("is unused",)),
    Row("simpletuner-lycoris-dora", "lycoris", dora="per output row"),
    Row("mflux", "mflux"),
    Row("comfyui-extract", "comfyui-native (fused qkv"),
    Row("comfyui-train-node", "comfyui-native (fused qkv"),
    Row("civitai-fused-with-te", "comfyui-native (fused qkv", unmatched={
        "lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight": TE,
        "lora_te_encoder_layers_0_self_attn_q_proj.lora_up.weight": TE,
        "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight": TE,
        "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_B.weight": TE}),
    Row("posted-bare-lokr", "bare module names (lycoris)", notes=("is unused",)),
    Row("posted-ai-toolkit-lycoris-prefix", "lycoris", notes=("is unused",)),
    Row("posted-civitai-dora", "comfyui", dora="per output row"),
    Row("mixed-anime-z", "mixed (split and fused qkv)", notes=("the same weights twice",), unmatched={
        f"lora_unet_layers_0_attention_qkv.{k}": "redundant" for k in ("lora.down.weight", "lora.up.weight", "alpha")}),
    Row("diffusers-dreambooth", "diffusers", notes=("comes from metadata 'lora_adapter_metadata'",),
        unmatched={"text_encoder.layers.0.self_attn.q_proj.lora_A.weight": TE,
                   "text_encoder.layers.0.self_attn.q_proj.lora_B.weight": TE}),
]


@pytest.fixture(scope="module")
def turbo():
    return ModuleIndex(meta_model())


def _probe(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n))


def _effect(target, index) -> torch.Tensor:
    """What the resolved target adds to the module's output for the probe input (or its 1-D diff)."""
    t = {k: v.float() for k, v in target.tensors.items()}
    if target.algorithm == "full" and t["diff"].dim() == 1:
        return t["diff"] * target.scale
    algo = algorithms.get(target.algorithm)
    if algo.needs_weight:  # the delta depends on the base weight: the builders' shared one (OFT)
        w = base_weight(tuple(index.shapes[target.module].shape))
        return algo.bypass(_probe(w.shape[1])[None], t, weight=w)[0] * target.scale
    n_in = algorithms.delta_shape(target.algorithm, {k: tuple(v.shape) for k, v in t.items()})[1]
    y = algorithms.bypass(target.algorithm, _probe(n_in)[None], t)[0] * target.scale
    return y if target.delta_rows is None else y[target.delta_rows[0]:target.delta_rows[1]]


def _write(tmp_path, built: Built):
    path = tmp_path / "a.safetensors"
    save_file({k: v.contiguous() for k, v in built.tensors.items()}, str(path), metadata=built.metadata or None)
    return path


def test_every_row_has_a_builder():
    assert sorted(r.name for r in ROWS) == sorted(BUILDERS)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_real_layout(tmp_path, turbo, row):
    built = BUILDERS[row.name](turbo, _probe)
    adapter = load_adapter(_write(tmp_path, built), turbo)
    info = summarize(adapter, turbo)
    assert row.label in info["format"], info["format"]
    # Lands on exactly the modules the trainer trained, each at its trained scale and effect.
    assert sorted(adapter.modules) == sorted(built.effects)
    for t in adapter.targets:
        assert t.scale == pytest.approx(built.scales[t.module], rel=1e-6), (t.module, t.scale_rule)
        if t.module in built.biases:
            assert torch.equal(t.tensors["diff_b"], built.biases[t.module])
        if t.dora is None:
            want = built.effects[t.module]
            torch.testing.assert_close(_effect(t, turbo), want, rtol=2e-4, atol=2e-4 * float(want.abs().max()))
    assert {u.key: u.reason for u in adapter.unmatched}.keys() == row.unmatched.keys()
    for u in adapter.unmatched:
        assert row.unmatched[u.key] in u.reason, u.reason
    assert tuple(u.key for u in adapter.ignored) == row.ignored
    assert all("trainer data" in u.reason for u in adapter.ignored)
    for text in row.notes:
        assert any(text in n for n in adapter.notes), adapter.notes
    assert info["dora_orientation"] == row.dora
    json.dumps(info, allow_nan=False)  # the report is strict JSON (no inf alpha)


def test_full_factor_lokr_alpha_shows_unused(tmp_path, turbo):
    built = BUILDERS["ai-toolkit-lokr-full-fp16"](turbo, _probe)
    assert all(math.isinf(v) for k, v in built.tensors.items() if k.endswith(".alpha"))
    info = summarize(load_adapter(_write(tmp_path, built), turbo), turbo)
    assert info["alphas"] == {"unused": len(built.effects)}
    assert all(t["alpha"] is None and t["alpha_used"] is False for t in info["targets"])
    assert set(info["scale_rules"]) == {"1 (both LoKr factors full; alpha unused)"}
