"""Our engine against diffusers' own Z-Image LoRA loader on the files it reads (kohya, ai-toolkit, ...).

diffusers converts the file with its Z-Image converter and loads it into PEFT layers on a deep copy
(`load_lora_adapter` + `set_adapters`), exactly what `ZImagePipeline.load_lora_weights` does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _apply_util import Pristine, output, rel_err
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers
from safetensors.torch import load_file

from zimage_lora import apply_adapter, examples, list_adapters, remove_adapter

TOL = 2e-5


def _diffusers_output(model, path, scale: float) -> torch.Tensor:
    ref = copy.deepcopy(model)
    converted = _convert_non_diffusers_z_image_lora_to_diffusers(load_file(str(path)))
    ref.load_lora_adapter(converted, prefix="transformer", adapter_name="x")
    ref.set_adapters(["x"], [scale])
    return output(ref)


@pytest.mark.parametrize("layout", ["kohya", "ai-toolkit", "mixed", "musubi-other"])
def test_matches_diffusers_loader(tmp_path, tiny, layout):
    path = examples.make_adapter(layout, tmp_path / f"{layout}.safetensors", tiny, rank=4, alpha=3.0, seed=11)
    scale = 1.3
    base = output(tiny)
    ref = _diffusers_output(tiny, path, scale)
    pristine = Pristine(tiny)
    for mode in ("dynamic", "merged"):
        report = apply_adapter(tiny, path, mode=mode, scale=scale, name="x")
        assert len(report.modules) == 37
        assert [(a.name, a.mode, a.scale) for a in list_adapters(tiny)] == [("x", mode, scale)]
        err = rel_err(output(tiny), ref, base)
        assert err < TOL, f"{layout} {mode}: relative error {err:.2e}"
        remove_adapter(tiny, "x")
        pristine.assert_same(tiny)
