"""BOFT in PEFT's form (`BOFTConfig`, one butterfly stage) against PEFT's own forward, merged and
dynamic, on the tiny Z-Image transformer; PEFT writes the folder itself (`save_pretrained`)."""

from __future__ import annotations

import copy

import pytest
import torch
from _apply_util import Pristine, output, rel_err
from peft import BOFTConfig, get_peft_model
from safetensors.torch import save_file

from zimage_lora import apply_adapter, load_adapter, remove_adapter
from zimage_lora.formats.reader import read_adapter_file

TOL = 1e-5
TARGETS = ["to_q", "to_v", "w1"]


def _peft_folder(tiny, tmp_path, *, scaled_rows: bool):
    model = get_peft_model(copy.deepcopy(tiny), BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=1,
                                                           target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "boft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "boft_s" in name and scaled_rows:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    model.save_pretrained(str(tmp_path / "peft-boft"))
    return tmp_path / "peft-boft", model.base_model.model


@pytest.mark.parametrize("scaled_rows", [True, False])
@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_peft_boft_matches_peft_forward(tiny, tmp_path, mode, scaled_rows):
    folder, ref = _peft_folder(tiny, tmp_path, scaled_rows=scaled_rows)
    base, want = output(tiny), output(ref)
    adapter = load_adapter(folder, tiny)
    assert not adapter.unmatched and {t.algorithm for t in adapter.targets} == {"boft-input"}
    pristine = Pristine(tiny)
    apply_adapter(tiny, folder, mode=mode, name="boft")
    assert rel_err(output(tiny), want, base) < TOL
    if mode == "dynamic":  # without row scales the input is rotated (no dense delta); with them, dense
        kinds = {s.kind for m in tiny.modules() if type(m).__name__ == "AdapterLinear" for s in m.slots.values()}
        assert kinds == ({"dense"} if scaled_rows else {"oft_in"}), kinds
    remove_adapter(tiny, "boft")
    pristine.assert_same(tiny)


def test_several_butterfly_stages_are_reported_with_the_form(tiny, tmp_path):
    path = tmp_path / "boft2.safetensors"
    save_file({"base_model.model.layers.0.attention.to_q.boft_R": torch.zeros(2, 4, 8, 8),
               "base_model.model.layers.0.attention.to_q.boft_s": torch.ones(64, 1)}, str(path))
    file = read_adapter_file(path)
    assert not file.groups and len(file.unmatched) == 2
    assert all("boft_n_butterfly_factor=2" in u.reason and "supported are" not in u.reason for u in file.unmatched)
