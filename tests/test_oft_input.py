"""OFT v2 (input rotation: PEFT `OFTConfig`, OneTrainer OFT_2) against PEFT's own forward and against
OneTrainer's formula, merged and dynamic, on the tiny Z-Image transformer.

PEFT writes its folder itself (`save_pretrained`) and runs its own forward; OneTrainer's file is
rebuilt from its saving code (modules/module/oft_utils.py OFTRotationModule, LoRASaverMixin
._save_diffusers: 'transformer.' + diffusers names + '.oft_R.weight', and with scaled OFT the
'.oft_R.scaled_oft' buffer), its expected output computed here from its formula.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from _apply_util import Pristine, output, rel_err
from peft import OFTConfig, get_peft_model
from safetensors.torch import save_file

from zimage_lora import LoRAError, apply_adapter, load_adapter, remove_adapter
from zimage_lora.formats.reader import read_adapter_file
from zimage_lora.keys import ModuleIndex
from zimage_lora.summary import summarize

TOL = 1e-5
TARGETS = ["to_q", "to_k", "to_v", "w1", "w3"]


def _peft_folder(tiny, tmp_path, block: int, seed: int = 0):
    """PEFT's own OFT (Cayley-Neumann, 5 terms) on a copy of the model, random rotations, saved by PEFT."""
    ref = copy.deepcopy(tiny)
    model = get_peft_model(ref, OFTConfig(oft_block_size=block, r=0, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "oft_R" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(tmp_path / "peft-oft"))
    return tmp_path / "peft-oft", model.base_model.model


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_peft_oft_matches_peft_forward(tiny, tmp_path, mode):
    folder, ref = _peft_folder(tiny, tmp_path, block=8)
    base, want = output(tiny), output(ref)
    pristine = Pristine(tiny)
    adapter = load_adapter(folder, tiny)
    assert not adapter.unmatched and {t.algorithm for t in adapter.targets} == {"oft-input"}
    apply_adapter(tiny, folder, mode=mode, name="oft")
    assert rel_err(output(tiny), want, base) < TOL
    remove_adapter(tiny, "oft")
    pristine.assert_same(tiny)


def test_dynamic_oft_rotates_the_input_without_a_dense_delta(tiny, tmp_path):
    folder, _ref = _peft_folder(tiny, tmp_path, block=8)
    apply_adapter(tiny, folder, mode="dynamic", name="oft")
    slots = [m for m in tiny.modules() if type(m).__name__ == "AdapterLinear"]
    assert slots
    kinds = {s.kind for m in slots for s in m.slots.values()}
    assert kinds == {"oft_in"}, kinds


def _onetrainer_file(tiny, tmp_path, *, scaled: bool, block: int = 16, seed: int = 1):
    """OneTrainer OFT_2 DIFFUSERS output (LoRASaverMixin._save_diffusers -> convert_to_diffusers leaves oft_R
    keys unchanged): 'transformer.<module>.oft_R.weight' (r, b(b-1)/2) and, scaled, '.oft_R.scaled_oft'."""
    g = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for name in ("layers.0.attention.to_q", "layers.1.feed_forward.w1"):
        n_in = tiny.get_submodule(name).in_features
        r, n = n_in // block, block * (block - 1) // 2
        packed = torch.randn(r, n, generator=g) * 0.2
        sd[f"transformer.{name}.oft_R.weight"] = packed
        if scaled:
            sd[f"transformer.{name}.oft_R.scaled_oft"] = torch.tensor(True)
        expected[name] = _onetrainer_rotation(packed, block, scaled)
    path = tmp_path / "onetrainer-oft.safetensors"
    save_file(sd, str(path), metadata={"ot_branch": "master", "ot_revision": "0" * 40})
    return path, expected


def _onetrainer_rotation(packed: torch.Tensor, b: int, scaled: bool) -> torch.Tensor:
    """OneTrainer OFTRotationModule: weight / (2 sqrt(b - 1)) when scaled, skew from the row-major strict upper
    triangle, R = I + 2Q + 2Q^2 + 2Q^3 + Q^4 (`_cayley_batch`, 5 Neumann terms), in float64 here."""
    w = packed.double() / (2 * math.sqrt(b - 1) if scaled else 1.0)
    m = torch.zeros(w.shape[0], b, b, dtype=torch.float64)
    iu = torch.triu_indices(b, b, 1)
    m[:, iu[0], iu[1]] = w
    q = m - m.transpose(1, 2)
    eye = torch.eye(b, dtype=torch.float64)
    return eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_onetrainer_oft_matches_its_formula(tiny, tmp_path, scaled, mode):
    path, rotations = _onetrainer_file(tiny, tmp_path, scaled=scaled)
    ref = copy.deepcopy(tiny)
    with torch.no_grad():  # OneTrainer OFTModule.forward on a Linear: orig_forward(x_k @ R_k per block)
        for name, rot in rotations.items():
            layer = ref.get_submodule(name)
            w = layer.weight.double()
            rotated = torch.einsum("ork,rkc->orc", w.reshape(w.shape[0], rot.shape[0], -1), rot.transpose(1, 2))
            layer.weight.copy_(rotated.reshape(w.shape).float())
    base, want = output(tiny), output(ref)
    apply_adapter(tiny, path, mode=mode, name="ot")
    assert rel_err(output(tiny), want, base) < TOL


def test_onetrainer_oft_is_labelled_and_described(tiny, tmp_path):
    path, _ = _onetrainer_file(tiny, tmp_path, scaled=True)
    adapter = load_adapter(path, tiny)
    info = summarize(adapter, ModuleIndex(tiny))
    assert info["format"] == "onetrainer (diffusers)"
    assert {t.algorithm for t in adapter.targets} == {"oft-input"}
    assert not adapter.unmatched


def test_strength_is_linear_in_both_modes(tiny, tmp_path):
    folder, _ = _peft_folder(tiny, tmp_path, block=8)
    outs = {}
    for mode in ("merged", "dynamic"):
        m = copy.deepcopy(tiny)
        apply_adapter(m, folder, mode=mode, scale=0.5, name="oft")
        outs[mode] = output(m)
    torch.testing.assert_close(outs["merged"], outs["dynamic"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, named", [
    ({"use_cayley_neumann": False}, "use_cayley_neumann=false"),
    ({"num_cayley_neumann_terms": 3}, "num_cayley_neumann_terms=3"),
    ({"coft": True}, "coft=true"),
])
def test_peft_oft_forms_that_build_r_otherwise_are_reported_with_the_form(tiny, tmp_path, options, named):
    folder, _ = _peft_folder(tiny, tmp_path, block=8)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(options)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(LoRAError):  # every key is of that form: nothing to apply
        load_adapter(folder, tiny)
    file = read_adapter_file(folder / "adapter_model.safetensors", cfg)
    assert not file.groups and file.unmatched
    for u in file.unmatched:  # what inspect lists for each key
        assert named in u.reason and "PEFT OFTConfig" in u.reason and "supported are" not in u.reason
