"""Our engine against PEFT on the tiny Z-Image transformer: same factors, same input, both modes.

PEFT gets the factors straight from the saved PEFT folder (read with safetensors, not with our
loader) and injected into a deep copy of the same model.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _apply_util import Pristine, output, rel_err
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from zimage_lora import apply_adapter, examples, remove_adapter, set_adapter_scale

TOL = 2e-5
PREFIX = "base_model.model."


def _write(tmp_path, model, name, *, rank=4, alpha=2.0, seed=0, dora=False, rslora=False, targets=None):
    folder = examples.make_adapter(
        "peft-dora" if dora else "peft", tmp_path / name, model, rank=rank, alpha=alpha, seed=seed, targets=targets
    )
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["use_rslora"] = rslora
    cfg_path.write_text(json.dumps(cfg))
    return folder


def _inject(ref: torch.nn.Module, folder, name: str) -> None:
    """Put the folder's factors into PEFT LoRA layers on `ref` (PEFT computes the scaling itself)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = load_file(str(folder / "adapter_model.safetensors"))
    modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in sd})
    config = LoraConfig(
        r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=modules,
        use_rslora=cfg["use_rslora"], use_dora=cfg["use_dora"],
    )
    inject_adapter_in_model(config, ref, adapter_name=name)
    with torch.no_grad():
        for m in modules:
            layer = ref.get_submodule(m)
            layer.lora_A[name].weight.copy_(sd[f"{PREFIX}{m}.lora_A.weight"])
            layer.lora_B[name].weight.copy_(sd[f"{PREFIX}{m}.lora_B.weight"])
            if cfg["use_dora"]:
                layer.lora_magnitude_vector[name].weight.copy_(sd[f"{PREFIX}{m}.lora_magnitude_vector"])


def _activate(ref: torch.nn.Module, weights: dict[str, float]) -> None:
    for module in ref.modules():
        if isinstance(module, LoraLayer):
            names = [n for n in weights if n in module.lora_A]
            module.set_adapter(names)
            for n in names:
                module.set_scale(n, weights[n])


def _peft_output(model, folders: dict[str, object], weights: dict[str, float]) -> torch.Tensor:
    ref = copy.deepcopy(model)
    for name, folder in folders.items():
        _inject(ref, folder, name)
    _activate(ref, weights)
    return output(ref)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
@pytest.mark.parametrize(
    "kind", [dict(rank=4, alpha=2.0), dict(rank=8, alpha=3.0, rslora=True), dict(rank=4, alpha=6.0, dora=True)],
    ids=["alpha-ne-rank", "rslora", "dora"],
)
def test_single_adapter_matches_peft(tmp_path, tiny, mode, kind):
    folder = _write(tmp_path, tiny, "a", seed=3, **kind)
    base = output(tiny)
    ref = _peft_output(tiny, {"a": folder}, {"a": 1.0})
    pristine = Pristine(tiny)
    report = apply_adapter(tiny, folder, mode=mode, name="a")
    assert len(report.applied) == 37 and not report.unmatched
    err = rel_err(output(tiny), ref, base)
    assert err < TOL, f"{mode} {kind}: relative error {err:.2e}"
    remove_adapter(tiny, "a")
    pristine.assert_same(tiny)


@pytest.mark.parametrize("modes", [("dynamic", "dynamic"), ("merged", "merged"), ("merged", "dynamic")])
def test_two_adapters_with_weights_match_peft(tmp_path, tiny, modes):
    targets = [n for n in examples.linear_names(tiny) if "attention" in n or "feed_forward" in n]
    fa = _write(tmp_path, tiny, "a", rank=4, alpha=2.0, seed=1)
    fb = _write(tmp_path, tiny, "b", rank=8, alpha=8.0, seed=2, targets=targets)
    weights = {"a": 0.8, "b": -0.6}
    base = output(tiny)
    ref = _peft_output(tiny, {"a": fa, "b": fb}, weights)
    ref_b = _peft_output(tiny, {"b": fb}, {"b": -0.6})
    pristine = Pristine(tiny)
    apply_adapter(tiny, fa, mode=modes[0], name="a", scale=0.3)
    apply_adapter(tiny, fb, mode=modes[1], name="b", scale=-0.6)
    set_adapter_scale(tiny, "a", 0.8)  # re-weighting lands on the same result as applying at 0.8
    err = rel_err(output(tiny), ref, base)
    assert err < TOL, f"{modes}: relative error {err:.2e}"
    # Removing one leaves exactly the other (PEFT with only 'b' active).
    remove_adapter(tiny, "a")
    assert rel_err(output(tiny), ref_b, base) < TOL
    remove_adapter(tiny)
    pristine.assert_same(tiny)


def test_removing_one_of_two_matches_peft_with_the_other(tmp_path, tiny):
    fa = _write(tmp_path, tiny, "a", rank=4, alpha=2.0, seed=1)
    fb = _write(tmp_path, tiny, "b", rank=4, alpha=4.0, seed=2, dora=True)
    base = output(tiny)
    # DoRA at strength 1 (below 1 our strength interpolates the weight, ComfyUI's convention; PEFT's
    # set_scale rescales the delta inside the norm instead, a different curve).
    ref_b = _peft_output(tiny, {"b": fb}, {"b": 1.0})
    pristine = Pristine(tiny)
    apply_adapter(tiny, fa, mode="merged", name="a", scale=0.5)
    apply_adapter(tiny, fb, mode="merged", name="b")
    remove_adapter(tiny, "a")
    assert rel_err(output(tiny), ref_b, base) < TOL
    remove_adapter(tiny, "b")
    pristine.assert_same(tiny)
