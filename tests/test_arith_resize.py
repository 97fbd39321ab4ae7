"""`resize`: the rank rules on planted spectra (expected ranks worked out by hand from each rule's
definition), optimality against torch.linalg.svd, LoKr through the dense path, sizes, the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import LoRAError, apply_adapter, load_adapter
from zimage_lora.arithmetic import resize
from zimage_lora.arithmetic.resize import resize_report
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECTRUM = [8.0, 4.0, 2.0, 1.0, 0.5]
MODULES = ["layers.0.feed_forward.w1", "layers.1.attention.to_q", "noise_refiner.0.attention.to_out.0"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def _orthonormal(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]


@pytest.fixture(scope="module")
def planted(model, tmp_path_factory):
    """A kohya LoRA (alpha = rank: scale 1) whose every module has singular values SPECTRUM."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in MODULES:
        lin = model.get_submodule(name)
        u, v = _orthonormal(g, lin.out_features, 5), _orthonormal(g, lin.in_features, 5)
        stem = "lora_unet_" + name.replace(".", "_")
        sd[stem + ".lora_up.weight"] = (u * torch.tensor(SPECTRUM, dtype=torch.float64)).float().contiguous()
        sd[stem + ".lora_down.weight"] = v.T.float().contiguous()
        sd[stem + ".alpha"] = torch.tensor(5.0)
    path = tmp_path_factory.mktemp("planted") / "planted.safetensors"
    save_file(sd, str(path))
    return path


# S^2 = 64, 16, 4, 1, 0.25 (sum 85.25); cumulative S^2 fractions .751 .938 .985 .997 1;
# cumulative S fractions (sum 15.5) .516 .774 .903 .968 1.
@pytest.mark.parametrize("rule,expected", [
    (dict(rank=3), 3),
    (dict(energy=0.99), 4),  # first S^2 fraction >= .99 is the 4th
    (dict(energy=0.75), 1),  # 64 / 85.25 = .7507 already holds it
    (dict(fro=0.95), 2),  # kohya: first S^2 fraction >= .95^2 = .9025 is the 2nd
    (dict(ratio=3.0), 2),  # values > 8 / 3: 8 and 4
    (dict(cumulative=0.9), 3),  # first S fraction >= .9 is the 3rd
    # kohya's len(S) - 1 bound is of the dense delta's spectrum (64 values here), so all 5 can stay
    (dict(fro=0.999999), 5),
])
def test_rank_rules_on_a_planted_spectrum(model, planted, rule, expected):
    adapter = resize(planted, model=model, **rule)
    assert {t.tensors["down"].shape[0] for t in adapter.targets} == {expected}
    for t in adapter.targets:
        kept = torch.linalg.svdvals((t.tensors["up"] @ t.tensors["down"]).double())[:expected]
        torch.testing.assert_close(kept, torch.tensor(SPECTRUM[:expected], dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_rank_caps_a_dynamic_rule(model, planted):
    adapter = resize(planted, model=model, energy=0.999, rank=2)
    assert {t.tensors["down"].shape[0] for t in adapter.targets} == {2}


@pytest.mark.parametrize("layout", ["kohya", "lycoris-lokr-factorized", "lycoris-loha"])
def test_resize_is_the_best_approximation_of_that_rank(model, tmp_path, layout):
    src = make_adapter(layout, tmp_path / "a.safetensors", model, rank=4, alpha=3.0, seed=2)
    adapter, report = resize_report(src, model=model, rank=2)
    original = load_adapter(src, model)
    m0, m1 = copy.deepcopy(model), copy.deepcopy(model)
    apply_adapter(m0, original, mode="merged")
    base = dict(model.state_dict())
    w0 = m0.state_dict()
    errors = {m["module"]: m["error"] for m in report.modules}
    for t in adapter.targets:
        if t.algorithm != "lora":
            continue
        ref = (w0[t.module + ".weight"] - base[t.module + ".weight"]).double()
        s = torch.linalg.svdvals(ref)
        best = float(s[2:].pow(2).sum().sqrt())
        ours = float((ref - (t.tensors["up"] @ t.tensors["down"]).double()).norm())
        assert ours == pytest.approx(best, rel=1e-3, abs=1e-6)
        assert errors[t.module] == pytest.approx(best / float(s.norm()), rel=1e-3, abs=1e-6)
    if layout == "kohya":  # a LoKr / LoHa is compact: its rank-2 LoRA need not be smaller
        assert report.bytes_after == report.bytes_before // 2
    apply_adapter(m1, adapter, mode="merged")  # the result applies


def test_resize_refusals(model, planted):
    with pytest.raises(LoRAError, match="resize needs a rule"):
        resize(planted, model=model)
    with pytest.raises(LoRAError, match="give one of --energy, --fro, --ratio, --cumulative, not fro and ratio"):
        resize(planted, model=model, fro=0.9, ratio=2.0)
    with pytest.raises(LoRAError, match="--ratio must be at least 1"):
        resize(planted, model=model, ratio=0.5)


def test_cli_resize(model, planted, tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model.config)))
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(planted), "--fro", "0.95", "--out", str(out), "--model", str(config), "--json",
                 "--to", "comfy"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {m["rank"] for m in doc["modules"]} == {2} and {m["rank_before"] for m in doc["modules"]} == {5}
    assert doc["bytes_after"] < doc["bytes_before"]
    assert set(MODULES) <= set(load_adapter(out, model).modules)  # comfy fuses a lone to_q with zero k, v
