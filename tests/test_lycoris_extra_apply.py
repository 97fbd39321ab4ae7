"""GLoRA, OFT (diag-oft), BOFT and IA3 end to end on the tiny Z-Image transformer, against LyCORIS 4.1.3.

Each file is what LyCORIS itself writes: `lycoris.create_lycoris` on the model (every Linear, keys
`lycoris_<module path>`), every trainable tensor filled with random values (LyCORIS starts some at
zero), then its own `LycorisNetwork.save_weights`. The reference is LyCORIS's own forward of the same
network at multiplier = our strength, where the two agree (diag-oft with `rescaled` and BOFT agree at
strength 1 only: LyCORIS interpolates those toward I differently; see algorithms/oft.py, boft.py).
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from _apply_util import Pristine, output, rel_err
from torch import nn

from zimage_lora import apply_adapter, examples, remove_adapter, set_adapter_scale
from zimage_lora.apply.layer import AdapterLinear
from zimage_lora.cli import main

lycoris = pytest.importorskip("lycoris", reason="LyCORIS is not installed (pip install lycoris-lora)")

logging.getLogger("lycoris").setLevel(logging.ERROR)
TOL = 1e-4
# case -> (LyCORIS algo, its kwargs, preset, strengths where LyCORIS's multiplier is our strength, ours)
LINEAR = (1.0, -0.6)
ONLY_1 = (1.0,)
IA3_IN = {"target_module": ["Linear"], "module_algo_map": {"Linear": {"algo": "ia3", "train_on_input": True}}}
# BOFT needs a power-of-two count of even blocks: LyCORIS cannot write it for the 170-wide w1/w3.
NO_170 = {"target_module": ["Linear"], "use_fnmatch": True, "exclude_name": ["*feed_forward.w1", "*feed_forward.w3"]}
CASES = {
    "glora": ("glora", {}, None, LINEAR, "glora"),
    "oft": ("diag-oft", {}, None, LINEAR, "oft"),
    "oft-constraint": ("diag-oft", {"constraint": 1e-2}, None, LINEAR, "oft"),
    "oft-rescaled": ("diag-oft", {"rescaled": True}, None, ONLY_1, "oft"),
    "oft-constraint-rescaled": ("diag-oft", {"constraint": 1e-2, "rescaled": True}, None, ONLY_1, "oft"),
    "boft": ("boft", {"constraint": 1e-2}, NO_170, ONLY_1, "boft"),
    "ia3": ("ia3", {}, None, LINEAR, "ia3"),
    "ia3-input": ("ia3", {}, IA3_IN, LINEAR, "ia3"),
}
# The kernel each takes in dynamic mode: none of them a cached dense delta.
KERNELS = {"glora": {"lora"}, "oft": {"oft"}, "boft": {"boft"}, "ia3": {"ia3"}, "ia3-input": {"ia3_in"}}


@pytest.fixture(autouse=True)
def _keep_presets(monkeypatch):
    """LyCORIS presets set class attributes of LycorisNetwork; put them back after each test."""
    for name in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(lycoris.LycorisNetwork, name, getattr(lycoris.LycorisNetwork, name))


def _lycoris(tiny: nn.Module, case: str, path):
    """(a copy of `tiny` running LyCORIS's network, the network); the network saved at `path`."""
    algo, kwargs, preset, _s, _name = CASES[case]
    lycoris.LycorisNetwork.apply_preset(preset or {"target_module": ["Linear"]})
    ref = copy.deepcopy(tiny)
    torch.manual_seed(len(case))
    net = lycoris.create_lycoris(ref, 1.0, linear_dim=8, linear_alpha=2.0, algo=algo, **kwargs)
    net.apply_to()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("rescale"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.3 if algo == "ia3" else 0.1)
    # dtype None keeps IA3's on_input flag as LyCORIS registers it (int64); the others are fp32 anyway.
    net.save_weights(str(path), None, None)
    return ref, net


def _at(ref: nn.Module, net, strength: float) -> torch.Tensor:
    net.set_multiplier(strength)
    return output(ref)


def _kinds(model: nn.Module) -> set[str]:
    return {s.kind for m in model.modules() if isinstance(m, AdapterLinear) for s in m.slots.values()}


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_lycoris_forward_and_restores(tmp_path, tiny, case, mode):
    path = tmp_path / f"{case}.safetensors"
    ref, net = _lycoris(tiny, case, path)
    strengths = CASES[case][3]
    base = output(tiny)
    pristine = Pristine(tiny)
    apply_adapter(tiny, path, mode=mode, scale=strengths[0], name="x")
    assert rel_err(output(tiny), _at(ref, net, strengths[0]), base) < TOL
    if mode == "dynamic":
        assert _kinds(tiny) == KERNELS.get(case, KERNELS[CASES[case][4]])
    for s in strengths[1:]:  # re-weight
        set_adapter_scale(tiny, "x", s)
        assert rel_err(output(tiny), _at(ref, net, s), base) < TOL
    remove_adapter(tiny)
    pristine.assert_same(tiny)


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
@pytest.mark.parametrize("case", ["glora", "oft-rescaled", "boft", "ia3-input"])
def test_stacks_with_a_plain_lora(tmp_path, tiny, case, mode):
    """Applied first, then a LoRA: the reference is LyCORIS's merged weights (`get_merged_weight`
    of each of its modules), then our LoRA merged on top (checked against PEFT and LyCORIS elsewhere)."""
    path = tmp_path / f"{case}.safetensors"
    ref, net = _lycoris(tiny, case, path)
    lora = examples.make_adapter("kohya", tmp_path / "lora.safetensors", tiny, rank=4, alpha=2.0, seed=3)
    names = {id(m): n for n, m in ref.named_modules()}
    merged_ref = copy.deepcopy(tiny)
    with torch.no_grad():
        for module in net.loras:
            weight, _bias = module.get_merged_weight(multiplier=1.0)
            merged_ref.get_submodule(names[id(module.org_module[0])]).weight.copy_(weight)
    apply_adapter(merged_ref, lora, mode="merged", scale=0.8)
    base = output(tiny)
    pristine = Pristine(tiny)
    apply_adapter(tiny, path, mode=mode, name="x")
    apply_adapter(tiny, lora, mode=mode, scale=0.8, name="lora")
    assert rel_err(output(tiny), output(merged_ref), base) < TOL
    remove_adapter(tiny)
    pristine.assert_same(tiny)


@pytest.mark.parametrize("case,algorithm,factors", [
    ("glora", "glora", "W @ 64x8 @ 8x64 + 64x8 @ 8x64"),
    ("oft-rescaled", "oft", "8 rotations of 8x8 + rescale"),
    ("boft", "boft", "butterfly of 4 stages x 8 rotations of 8x8"),
    ("ia3-input", "ia3", "64 channel scales"),
])
def test_inspect_names_the_algorithm(tmp_path, tiny, tiny_config_file, capsys, case, algorithm, factors):
    path = tmp_path / f"{case}.safetensors"
    _lycoris(tiny, case, path)
    assert main(["inspect", str(path), "--model", str(tiny_config_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["algorithms"] == [algorithm] and not info["unmatched"]
    q = next(t for t in info["targets"] if t["module"] == "layers.0.attention.to_q")
    assert (q["algorithm"], q["factors"]) == (algorithm, factors)
    assert main(["inspect", str(path), "--model", str(tiny_config_file)]) == 0
    assert algorithm in capsys.readouterr().out


@pytest.mark.parametrize("case", ["glora", "oft-constraint-rescaled", "boft", "ia3", "ia3-input"])
def test_convert_keeps_them_in_kohya_and_refuses_other_layouts(tmp_path, tiny, tiny_config_file, case):
    from zimage_lora import LoRAError
    from zimage_lora.tools.convert import convert_adapter

    path = tmp_path / f"{case}.safetensors"
    ref, net = _lycoris(tiny, case, path)
    out = convert_adapter(path, "kohya", tmp_path / "kohya.safetensors", model=tiny_config_file)
    base = output(tiny)
    apply_adapter(tiny, out, mode="merged")
    assert rel_err(output(tiny), _at(ref, net, 1.0), base) < TOL
    remove_adapter(tiny)
    algorithm = CASES[case][4]
    # ComfyUI holds LyCORIS's OFT and BOFT (tests/test_comfyui_oft_convert.py); the others only kohya.
    comfyui = algorithm in ("oft", "boft")
    elsewhere = r"'kohya' or 'comfyui', which keep it\." if comfyui else r"'kohya', which keeps it\."
    for to in ("diffusers", "peft") + (() if comfyui else ("comfy",)):
        with pytest.raises(LoRAError, match=rf"--to {to} holds .* but the adapter has {algorithm} .*Convert to "
                           + elsewhere):
            convert_adapter(path, to, tmp_path / f"{to}.safetensors", model=tiny_config_file)


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
@pytest.mark.parametrize("case", ["oft-rescaled", "boft"])
def test_strength_is_linear_where_lycoris_interpolates_otherwise(tmp_path, tiny, case, mode):
    """Away from 1 our strength t gives W + t (W' - W), W' LyCORIS's own merged weight at multiplier 1
    (LyCORIS scales only the rotation with `rescale`, and moves each BOFT stage toward I)."""
    path = tmp_path / f"{case}.safetensors"
    ref, net = _lycoris(tiny, case, path)
    names = {id(m): n for n, m in ref.named_modules()}
    linear_ref = copy.deepcopy(tiny)
    with torch.no_grad():
        for module in net.loras:
            weight, _bias = module.get_merged_weight(multiplier=1.0)
            w = linear_ref.get_submodule(names[id(module.org_module[0])]).weight
            w.add_(weight - w, alpha=0.4)
    base = output(tiny)
    apply_adapter(tiny, path, mode=mode, scale=0.4)
    assert rel_err(output(tiny), output(linear_ref), base) < TOL
    assert rel_err(output(tiny), _at(ref, net, 0.4), base) > 10 * TOL  # LyCORIS's own multiplier differs


def test_a_bare_weight_without_on_input_is_no_ia3(tmp_path, tiny):
    """IA3's role is spelled '.weight': only '.on_input' beside it makes a key IA3."""
    from safetensors.torch import load_file, save_file

    from zimage_lora import load_adapter

    path = tmp_path / "ia3.safetensors"
    _lycoris(tiny, "ia3", path)
    sd = load_file(str(path))
    lone = "lycoris_layers_0_attention_to_q"
    del sd[lone + ".on_input"]
    save_file(sd, str(path))
    adapter = load_adapter(path, tiny)
    assert lone.removeprefix("lycoris_") not in {t.module.replace(".", "_") for t in adapter.targets}
    assert len(adapter.targets) == 36 and {t.algorithm for t in adapter.targets} == {"ia3"}
    ((key, reason),) = [(u.key, u.reason) for u in adapter.unmatched]
    assert key == lone + ".weight" and reason.startswith("no known adapter suffix")
