"""`combine`: concat against the engine's own stack, truncation against torch.linalg.svd of the dense
delta, TIES / DARE against PEFT's add_weighted_adapter on the same tiny model, refusals, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from zimage_lora import LoRAError, UnsupportedError, apply_adapter, load_adapter
from zimage_lora.arithmetic import combine, save
from zimage_lora.arithmetic.combine import combine_report
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return {
        "kohya": make_adapter("kohya", root / "a.safetensors", model, rank=4, alpha=2.0, seed=1),
        "comfy": make_adapter("comfy-fused", root / "b.safetensors", model, rank=3, alpha=3.0, seed=2),
        "mixed": make_adapter("mixed", root / "c.safetensors", model, rank=2, alpha=1.0, seed=3),
        "peft": make_adapter("peft", root / "d", model, rank=5, alpha=4.0, seed=4),
        "lokr": make_adapter("lycoris-lokr-factorized", root / "e.safetensors", model, rank=3, seed=5),
        "full": make_adapter("lycoris-full", root / "f.safetensors", model, seed=6),
        "dora": make_adapter("lycoris-dora", root / "g.safetensors", model, rank=2, seed=7),
    }


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _stacked(model, specs) -> dict[str, torch.Tensor]:
    """The engine applying every input at its strength, merged, on a copy of the model."""
    m = copy.deepcopy(model)
    for i, (src, s) in enumerate(specs):
        apply_adapter(m, src, scale=s, mode="merged", name=f"in{i}")
    return _weights(m)


def _applied(model, adapter) -> dict[str, torch.Tensor]:
    m = copy.deepcopy(model)
    apply_adapter(m, adapter, mode="merged", name="combined")
    return _weights(m)


def _close(a: dict, b: dict, base: dict, tol: float = 1e-5) -> None:
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=k)
        moved += not torch.equal(b[k], base[k])
    assert moved > 30  # the comparison covers real changes


def test_concat_equals_the_engine_stack_across_layouts(model, files):
    specs = [(files["kohya"], 0.7), (files["comfy"], -0.4), (files["mixed"], 1.3), (files["peft"], 0.5)]
    adapter = combine(specs, model=model)
    up = {t.module: t.tensors["up"] for t in adapter.targets}
    # rank = the sum (the reader keeps one of the mixed file's split and fused copies)
    assert up["layers.0.feed_forward.w1"].shape[1] == up["layers.0.attention.to_q"].shape[1] == 4 + 3 + 2 + 5
    _close(_applied(model, adapter), _stacked(model, specs), _weights(model))
    doc = json.loads(adapter.metadata["zimage_lora_arithmetic"])
    assert [i["strength"] for i in doc["inputs"]] == [0.7, -0.4, 1.3, 0.5]
    assert all(len(i["sha256"]) == 64 for i in doc["inputs"]) and doc["error"] == 0.0


@pytest.mark.parametrize("to", ["kohya", "comfy", "diffusers", "peft"])
def test_written_result_loads_back_and_applies_the_same(model, files, tmp_path, to):
    specs = [(files["kohya"], 0.7), (files["comfy"], -0.4)]
    adapter = combine(specs, model=model, rank=5)
    out = save(adapter, tmp_path / ("out" if to == "peft" else "out.safetensors"), to=to)
    back = load_adapter(out, model)
    assert sorted(back.modules) == sorted(adapter.modules) and not back.unmatched
    _close(_applied(model, back), _applied(model, adapter), _weights(model))
    if to != "peft":
        with safe_open(str(out), "pt") as f:
            doc = json.loads(f.metadata()["zimage_lora_arithmetic"])
        assert doc["rule"] == {"rank": 5} and doc["method"] == "concat"


def _dense_deltas(model, specs) -> dict[str, torch.Tensor]:
    base = _weights(model)
    return {k: v - base[k] for k, v in _stacked(model, specs).items() if k.endswith(".weight") and v.dim() == 2}


@pytest.mark.parametrize("inputs", [("kohya", "comfy"), ("kohya", "lokr")], ids=["factor-path", "dense-path"])
def test_truncation_is_the_best_rank_r_approximation(model, files, inputs):
    specs = [(files[inputs[0]], 0.8), (files[inputs[1]], -0.6)]
    adapter, report = combine_report(specs, model=model, rank=3)
    deltas = _dense_deltas(model, specs)
    errors = {m["module"]: m["error"] for m in report.modules}
    lost = total = 0.0
    for t in adapter.targets:
        ref = deltas[t.module + ".weight"]
        s = torch.linalg.svd(ref.double())[1]
        best = float(s[3:].pow(2).sum().sqrt())  # Eckart-Young: nothing of rank 3 comes closer
        ours = float((ref.double() - t.tensors["up"].double() @ t.tensors["down"].double()).norm())
        assert t.tensors["down"].shape[0] == 3
        assert ours == pytest.approx(best, rel=1e-4, abs=1e-6)
        assert errors[t.module] == pytest.approx(best / float(s.pow(2).sum().sqrt()), rel=1e-3, abs=1e-6)
        lost, total = lost + best**2, total + float(s.pow(2).sum())
    assert report.error == pytest.approx((lost / total) ** 0.5, rel=1e-3)


def test_energy_keeps_the_fewest_values_holding_that_fraction(model, files):
    specs = [(files["kohya"], 1.0), (files["comfy"], 1.0)]
    adapter = combine(specs, model=model, energy=0.9)
    deltas = _dense_deltas(model, specs)
    for t in adapter.targets:
        s2 = torch.linalg.svd(deltas[t.module + ".weight"].double())[1].pow(2)
        frac = s2.cumsum(0) / s2.sum()
        k = t.tensors["down"].shape[0]
        assert frac[k - 1] >= 0.9 - 1e-9 and (k == 1 or frac[k - 2] < 0.9)


# --- TIES / DARE against PEFT ---------------------------------------------------------------------------

TARGETS = ["layers.0.attention.to_q", "layers.0.attention.to_k", "layers.1.feed_forward.w1",
           "noise_refiner.0.attention.to_out.0"]


@pytest.fixture(scope="module")
def peft_pair(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS),
                        adapter_name="one")
    pm.add_adapter("two", LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(root)
    return pm, root / "one", root / "two"


class _SeededBernoulli:
    """torch for PEFT's merge_utils, its bernoulli drawing from a generator seeded like ours."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __getattr__(self, name):
        return getattr(torch, name)

    def bernoulli(self, p):
        return torch.bernoulli(p, generator=self.generator)


@pytest.mark.parametrize("method,peft_type", [("ties", "ties_svd"), ("dare", "dare_linear_svd"),
                                              ("dare_ties", "dare_ties_svd")])
def test_ties_and_dare_match_peft(model, peft_pair, monkeypatch, method, peft_type):
    import peft.utils.merge_utils as merge_utils

    pm, one, two = peft_pair
    pm = copy.deepcopy(pm)
    # PEFT draws DARE's masks from the global RNG after initialising the new adapter; ours come from a
    # seeded generator in the same order (module, then input), so PEFT's draws are given that stream.
    monkeypatch.setattr(merge_utils, "torch", _SeededBernoulli(7))
    pm.base_model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "merged", combination_type=peft_type,
                                       svd_rank=3, density=0.5)
    ours = combine([(one, 0.7), (two, -0.4)], model=model, method=method, density=0.5, seed=7, rank=3)
    assert sorted(ours.modules) == sorted(TARGETS)
    for t in ours.targets:
        layer = pm.base_model.model.get_submodule(t.module)
        assert isinstance(layer, LoraLayer)
        ref = layer.get_delta_weight("merged")
        torch.testing.assert_close(t.tensors["up"] @ t.tensors["down"], ref, rtol=1e-4, atol=1e-5)


def test_ties_default_rank_is_the_largest_input_rank(model, files):
    adapter = combine([(files["kohya"], 1.0), (files["peft"], 1.0)], model=model, method="ties", density=0.3)
    assert {t.tensors["down"].shape[0] for t in adapter.targets if t.algorithm == "lora"} == {5}


# --- refusals -------------------------------------------------------------------------------------------

def test_refusals_name_the_input_module_and_fix(model, files):
    with pytest.raises(UnsupportedError, match=r"e\.safetensors is not a LoRA there.*--rank R or --energy E"):
        combine([files["kohya"], files["lokr"]], model=model)
    # (with the base weights a DoRA input is combined: tests/test_arith_base.py)
    meta_model = tiny_model(seed=1).to("meta")
    with pytest.raises(LoRAError, match=r"g\.safetensors: module \S+ holds a DoRA delta.*--model"):
        combine([files["kohya"], files["dora"]], model=meta_model, rank=2)
    with pytest.raises(LoRAError, match="unknown method 'svd'"):
        combine([files["kohya"]], model=model, method="svd")
    with pytest.raises(LoRAError, match="--density belongs to ties"):
        combine([files["kohya"]], model=model, density=0.5)
    with pytest.raises(LoRAError, match=r"density must be in \(0, 1\]"):
        combine([files["kohya"]], model=model, method="ties", density=0)
    with pytest.raises(LoRAError, match="rank must be a whole number"):
        combine([files["kohya"]], model=model, rank=0)
    with pytest.raises(LoRAError, match=r"--energy must be in \(0, 1\]"):
        combine([files["kohya"]], model=model, energy=1.5)


def test_full_diffs_and_biases_sum_exactly_when_truncated_to_full_rank(model, files):
    specs = [(files["kohya"], 0.5), (files["full"], 0.9)]
    adapter = combine(specs, model=model, rank=4096)  # every singular value kept: exact
    assert any("diff_b" in t.tensors for t in adapter.targets)
    _close(_applied(model, adapter), _stacked(model, specs), _weights(model), tol=2e-5)


def test_cli_combine_writes_json_and_a_loadable_file(model, files, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model.config)))
    out = tmp_path / "c.safetensors"
    code = main(["combine", f"{files['kohya']}:0.7", f"{files['comfy']}:-0.4", "--out", str(out), "--rank", "4",
                 "--model", str(config), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["rule"] == {"rank": 4} and 0 < doc["error"] < 1 and doc["out"] == str(out)
    assert load_adapter(out, model).targets
    assert main(["combine", str(files["kohya"]), "--out", str(out), "--model", str(config)]) == 1
    assert "already exists" in capsys.readouterr().err
