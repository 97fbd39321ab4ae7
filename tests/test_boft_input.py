"""BOFT in PEFT's form (`BOFTConfig`, one or several butterfly stages) against PEFT's own forward,
merged and dynamic, on the tiny Z-Image transformer; PEFT writes the folder itself (`save_pretrained`).

PEFT builds several stages only with its CUDA block-diagonal extension (peft 0.21.2
`tuners/boft/layer.py`: without it `update_layer` forces `boft_n_butterfly_factor=1`). `_fbd_on_cpu`
stands in for that extension alone (its documented forward: (N, D, H, H) blocks -> (N, D*H, D*H) block
diagonals); the permutations, the Cayley transform and the forward are PEFT's own."""

from __future__ import annotations

import copy

import pytest
import torch
from _apply_util import Pristine, output, rel_err
from peft import BOFTConfig, get_peft_model
from safetensors.torch import save_file

from zimage_lora import LoRAError, apply_adapter, load_adapter, remove_adapter

TOL = 1e-5
TARGETS = ["to_q", "to_v", "w1"]


class _BlockDiag:
    @staticmethod
    def forward(blocks: torch.Tensor) -> list[torch.Tensor]:
        return [torch.stack([torch.block_diag(*stage) for stage in blocks])]


@pytest.fixture
def _fbd_on_cpu(monkeypatch):
    from peft.tuners.boft import layer

    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: _BlockDiag)


def _peft_folder(tiny, tmp_path, *, scaled_rows: bool, stages: int = 1):
    model = get_peft_model(copy.deepcopy(tiny), BOFTConfig(boft_block_size=8, boft_n_butterfly_factor=stages,
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


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_several_butterfly_stages_match_peft_forward(tiny, tmp_path, _fbd_on_cpu, mode, stages):
    folder, ref = _peft_folder(tiny, tmp_path, scaled_rows=False, stages=stages)
    assert {tuple(p.shape)[0] for n, p in ref.named_parameters() if "boft_R" in n} == {stages}
    base, want = output(tiny), output(ref)
    apply_adapter(tiny, folder, mode=mode, name="boft")
    assert rel_err(output(tiny), want, base) < TOL
    if mode == "dynamic":  # the input runs through the stages; no dense delta
        kinds = {s.kind for m in tiny.modules() if type(m).__name__ == "AdapterLinear" for s in m.slots.values()}
        assert kinds == {"boft_in"}, kinds
    remove_adapter(tiny, "boft")


def test_several_stages_with_row_scales_match_peft_merged(tiny, tmp_path, _fbd_on_cpu):
    folder, ref = _peft_folder(tiny, tmp_path, scaled_rows=True, stages=3)
    base, want = output(tiny), output(ref)
    apply_adapter(tiny, folder, mode="merged", name="boft")
    assert rel_err(output(tiny), want, base) < TOL


def test_stage_counts_peft_cannot_have_are_refused(tiny, tmp_path):
    path = tmp_path / "boft2.safetensors"
    save_file({"base_model.model.layers.0.attention.to_q.boft_R": torch.zeros(3, 6, 8, 8),
               "base_model.model.layers.0.attention.to_q.boft_s": torch.ones(64, 1)}, str(path))
    with pytest.raises(LoRAError, match="3 butterfly stages need an even block size and a number of blocks "
                                        "divisible by 4"):
        load_adapter(path, tiny)
