"""Every layout of the format catalogue, read and resolved on the tiny model.

Expected deltas are computed here from the raw file with each trainer's documented rule (the
format table in docs/formats.md), independently of the library's reader, then compared with the
deltas of the resolved targets.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _deltas import resolved_deltas
from safetensors import safe_open

from zimage_lora import examples, load_adapter
from zimage_lora.keys.aliases import native_name

FUSED_LAYOUTS = {"kohya-fused", "comfy-fused"}


def _flat(n: str) -> str:
    return n.replace(".", "_")


def _read(path):
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata() or {}


def _lora_rule(prefix, down, up, flat=False, native=False, alpha_from=None):
    """Expected delta of a LoRA module stored under `prefix + name`: scale * up @ down."""

    def rule(sd, meta, cfg, name):
        module = native_name(name) if native else name
        stem = prefix + (_flat(module) if flat else module)
        a, b = sd[stem + down].float(), sd[stem + up].float()
        r = a.shape[0]
        if alpha_from == "key":
            scale = sd[stem + ".alpha"].item() / r
        elif alpha_from == "metadata":
            scale = json.loads(meta["lora_adapter_metadata"])["lora_alpha"] / r
        elif alpha_from == "config":
            scale = cfg["lora_alpha"] / r
        else:
            scale = 1.0
        return scale * (b @ a)

    return rule


def _lokr_rule(prefix, flat):
    def rule(sd, meta, cfg, name):
        stem = prefix + (_flat(name) if flat else name)
        w1 = sd[stem + ".lokr_w1"].float()
        if stem + ".lokr_w2" in sd:
            return torch.kron(w1, sd[stem + ".lokr_w2"].float())  # both factors full: scale 1
        a, b = sd[stem + ".lokr_w2_a"].float(), sd[stem + ".lokr_w2_b"].float()
        if stem + ".lokr_t2" in sd:
            w2 = torch.einsum("ij,ip,jr->pr", sd[stem + ".lokr_t2"].float(), a, b)
        else:
            w2 = a @ b
        return sd[stem + ".alpha"].item() / b.shape[0] * torch.kron(w1, w2)

    return rule


def _loha_rule(sd, meta, cfg, name):
    s = "lycoris_" + _flat(name)
    w1 = sd[s + ".hada_w1_a"].float() @ sd[s + ".hada_w1_b"].float()
    w2 = sd[s + ".hada_w2_a"].float() @ sd[s + ".hada_w2_b"].float()
    return sd[s + ".alpha"].item() / sd[s + ".hada_w1_b"].shape[0] * w1 * w2


def _full_rule(sd, meta, cfg, name):
    return sd["lycoris_" + _flat(name) + ".diff"].float()


def _fused_rule(prefix, down, up, flat):
    def rule(sd, meta, cfg, name):
        for i, part in enumerate(("to_q", "to_k", "to_v")):
            if name.endswith("attention." + part):
                block = name[: -len(part)] + "qkv"
                stem = prefix + (_flat(block) if flat else block)
                a, b = sd[stem + down].float(), sd[stem + up].float()
                full = sd[stem + ".alpha"].item() / a.shape[0] * (b @ a)
                d = full.shape[0] // 3
                return full[i * d:(i + 1) * d]
        return _lora_rule(prefix, down, up, flat=flat, native=True, alpha_from="key")(sd, meta, cfg, name)

    return rule


RULES = {
    "ai-toolkit": _lora_rule("diffusion_model.", ".lora_A.weight", ".lora_B.weight"),
    "diffusers": _lora_rule("transformer.", ".lora_A.weight", ".lora_B.weight", alpha_from="metadata"),
    "kohya": _lora_rule("lora_unet_", ".lora_down.weight", ".lora_up.weight", flat=True, alpha_from="key"),
    "kohya-fused": _fused_rule("lora_unet_", ".lora_down.weight", ".lora_up.weight", flat=True),
    "musubi-other": _lora_rule("diffusion_model.", ".lora_A.weight", ".lora_B.weight"),
    "diffsynth": _lora_rule("", ".lora_A.default.weight", ".lora_B.default.weight"),
    "lycoris-lora": _lora_rule("lycoris_", ".lora_down.weight", ".lora_up.weight", flat=True, alpha_from="key"),
    "lycoris-lokr": _lokr_rule("lycoris_", flat=True),
    "lycoris-lokr-factorized": _lokr_rule("lycoris_", flat=True),
    "lycoris-lokr-tucker": _lokr_rule("lycoris_", flat=True),
    "lycoris-loha": _loha_rule,
    "lycoris-full": _full_rule,
    "ai-toolkit-lokr": _lokr_rule("diffusion_model.", flat=False),
    "comfy-fused": _fused_rule("diffusion_model.", ".lora_A.weight", ".lora_B.weight", flat=False),
    "onetrainer-legacy": _lora_rule("transformer.", ".lora_down.weight", ".lora_up.weight", alpha_from="key"),
    "onetrainer-original": _lora_rule("", ".lora_A.weight", ".lora_B.weight", alpha_from="key"),
    "onetrainer-comfy": _lora_rule("diffusion_model.", ".lora_A.weight", ".lora_B.weight", alpha_from="key"),
    "mixed": _lora_rule("lora_unet_", ".lora.down.weight", ".lora.up.weight", flat=True, alpha_from="key"),
    "peft": _lora_rule("base_model.model.", ".lora_A.weight", ".lora_B.weight", alpha_from="config"),
}


@pytest.mark.parametrize("layout", sorted(RULES))
def test_layout_resolves_to_documented_delta(tmp_path, tiny, layout):
    names = examples.linear_names(tiny)
    target = tmp_path / (layout if layout.startswith("peft") else layout + ".safetensors")
    path = examples.make_adapter(layout, target, tiny, rank=4, alpha=3.0, seed=1)
    adapter = load_adapter(path, tiny)
    assert sorted(adapter.modules) == sorted(names)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    sd, meta = _read(file)
    cfg = json.loads((path / "adapter_config.json").read_text()) if path.is_dir() else {}
    ours = resolved_deltas(adapter, tiny)
    for name in names:
        expected = RULES[layout](sd, meta, cfg, name)
        torch.testing.assert_close(ours[name], expected, rtol=1e-5, atol=1e-6, msg=f"{layout}: {name}")
    if layout == "mixed":
        # F11: one set used, the other reported, and a note says which.
        assert adapter.notes and "fused qkv" in adapter.notes[0]
        assert {u.key for u in adapter.unmatched} and all("redundant" in u.reason for u in adapter.unmatched)
    else:
        assert adapter.unmatched == []


def test_every_catalogue_layout_has_an_example():
    # The catalogue rows F1..F11 plus PEFT folders all have a generator; DoRA ones are checked in the engine tests.
    assert set(RULES) | {"lycoris-dora", "peft-dora"} == set(examples.LAYOUTS)


@pytest.mark.parametrize("layout,on_out", [("lycoris-dora", True), ("peft-dora", True)])
def test_dora_magnitude_is_read(tmp_path, tiny, layout, on_out):
    target = tmp_path / (layout if layout.startswith("peft") else layout + ".safetensors")
    adapter = load_adapter(examples.make_adapter(layout, target, tiny), tiny)
    assert all(t.dora is not None and t.dora.on_out is on_out for t in adapter.targets)
    t = adapter.targets[0]
    assert t.dora.magnitude.shape == (dict(tiny.named_modules())[t.module].out_features,)


def test_lokr_alpha_ignored_when_both_factors_full(tmp_path, tiny):
    adapter = load_adapter(examples.make_adapter("ai-toolkit-lokr", tmp_path / "a.safetensors", tiny), tiny)
    assert all(t.scale == 1.0 for t in adapter.targets)
    assert all(t.alpha == pytest.approx(9999999999.0) for t in adapter.targets)


def test_fused_kohya_alpha_times_three_gives_same_scale(tmp_path, tiny):
    adapter = load_adapter(examples.make_adapter("kohya-fused", tmp_path / "a.safetensors", tiny, alpha=2.0), tiny)
    q = next(t for t in adapter.targets if t.module == "layers.0.attention.to_q")
    assert q.rank == 12 and q.alpha == 6.0 and math.isclose(q.scale, 0.5)
