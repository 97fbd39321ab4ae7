"""Cross-check against diffusers' own Z-Image converter on the layouts it reads.

diffusers folds alpha into lora_A/lora_B and renames keys to its module names; for every module,
its B @ A must equal our resolved scale * delta.
"""

from __future__ import annotations

import pytest
import torch
from _deltas import resolved_deltas
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers
from safetensors.torch import load_file

from zimage_lora import examples, load_adapter

# Layouts whose files diffusers' Z-Image converter accepts.
DIFFUSERS_READS = ["kohya", "ai-toolkit", "diffsynth", "onetrainer-comfy", "musubi-other", "mixed"]


@pytest.mark.parametrize("layout", DIFFUSERS_READS)
def test_same_deltas_as_diffusers_converter(tmp_path, tiny, layout):
    path = examples.make_adapter(layout, tmp_path / f"{layout}.safetensors", tiny, rank=4, alpha=3.0, seed=2)
    converted = _convert_non_diffusers_z_image_lora_to_diffusers(load_file(str(path)))
    theirs = {}
    for key, a in converted.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = converted[key.replace(".lora_A.weight", ".lora_B.weight")]
            theirs[module] = b.float() @ a.float()
    ours = resolved_deltas(load_adapter(path, tiny), tiny)
    assert set(theirs) == set(ours)
    for module, expected in theirs.items():
        torch.testing.assert_close(ours[module], expected, rtol=1e-5, atol=1e-6, msg=module)


def test_fused_qkv_dot_format_matches_diffusers_split(tmp_path, tiny):
    """A kohya-flat fused qkv file (dotted suffixes) splits into q, k, v as diffusers splits it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    sd = {
        "lora_unet_layers_0_attention_qkv.lora.down.weight": torch.randn(4, 64, generator=g),
        "lora_unet_layers_0_attention_qkv.lora.up.weight": torch.randn(192, 4, generator=g),
        "lora_unet_layers_0_attention_qkv.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "fused.safetensors"
    save_file(sd, str(path))
    converted = _convert_non_diffusers_z_image_lora_to_diffusers(dict(sd))
    ours = resolved_deltas(load_adapter(path, tiny), tiny)
    for part in ("to_q", "to_k", "to_v"):
        k = f"transformer.layers.0.attention.{part}"
        expected = converted[k + ".lora_B.weight"] @ converted[k + ".lora_A.weight"]
        torch.testing.assert_close(ours[f"layers.0.attention.{part}"], expected, rtol=1e-5, atol=1e-6)
