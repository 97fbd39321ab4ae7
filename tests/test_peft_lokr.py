"""PEFT's LoKr (`LoKrConfig`) with alpha != r: PEFT scales by alpha / r (the config's r and alpha, per
module through rank_pattern / alpha_pattern), also where lokr_w2 is a full matrix and r is not in the
file. Checked against PEFT's own forward on the tiny Z-Image transformer; PEFT writes the folder."""

from __future__ import annotations

import copy

import pytest
import torch
from _apply_util import output, rel_err
from peft import LoKrConfig, get_peft_model

from zimage_lora import apply_adapter, load_adapter

TOL = 1e-5


def _peft_folder(tiny, tmp_path):
    # r=2 keeps lokr_w2 low-rank on the 64-wide q/v (factor 8 x 8: PEFT goes full from r >= 4); w1 gets
    # r=16 through rank_pattern, a full lokr_w2, and its own alpha.
    config = LoKrConfig(r=2, alpha=7, target_modules=["to_q", "to_v", "w1"], rank_pattern={"w1": 16},
                        alpha_pattern={"w1": 3}, init_weights=False)
    model = get_peft_model(copy.deepcopy(tiny), config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(str(tmp_path / "peft-lokr"))
    return tmp_path / "peft-lokr", model.base_model.model


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_peft_lokr_scales_by_alpha_over_r(tiny, tmp_path, mode):
    folder, ref = _peft_folder(tiny, tmp_path)
    adapter = load_adapter(folder, tiny)
    scales = {t.module.rsplit(".", 1)[-1] if "attention" in t.module else "w1": t.scale for t in adapter.targets}
    assert scales == {"to_q": 3.5, "to_v": 3.5, "w1": 0.1875}
    full_w2 = [t for t in adapter.targets if "w2" in t.tensors]
    assert full_w2 and all(t.module.endswith("w1") for t in full_w2)  # the case whose r only the config has
    base, want = output(tiny), output(ref)
    apply_adapter(tiny, folder, mode=mode, name="lokr")
    assert rel_err(output(tiny), want, base) < TOL
