"""Per-block strengths: patterns resolved against the model's module names (expected values written by
hand from the rules in `zimage_lora.blocks`), and in the engine equal to the same adapter split into
per-module-group adapters at plain strengths (both modes, per-sample specs, re-weighting)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import zimage_lora as zl
from zimage_lora import blocks
from zimage_lora.apply import merge
from zimage_lora.examples import make_adapter, run_model, tiny_inputs, tiny_model
from zimage_lora.loading import load_adapter


@pytest.fixture(scope="module")
def turbo_names() -> list[str]:
    """Z-Image-Turbo's module tree at tiny widths: 30 blocks, 2 + 2 refiner blocks."""
    return blocks.model_names(tiny_model(0, n_layers=30, n_refiner_layers=2).named_modules())


ISSUE_EXAMPLE = {"*": 0.8, "layers.0-9": 0.4, "noise_refiner": 0, "*.feed_forward.*": 1.0}


@pytest.mark.parametrize(("module", "want"), [
    ("layers.3.attention.to_q", 0.4),  # layers.0-9: 10 blocks
    ("layers.3.feed_forward.w1", 0.4),  # *.feed_forward.*: in 34 blocks
    ("layers.15.feed_forward.w2", 1.0),  # feed_forward is narrower than '*'
    ("layers.15.attention.to_out.0", 0.8),
    ("noise_refiner.1.feed_forward.w1", 0.0),  # noise_refiner: 2 blocks
    ("context_refiner.0.feed_forward.w3", 1.0),
    ("t_embedder.mlp.0", 0.8),
])
def test_most_specific_pattern_wins(turbo_names, module, want):
    assert blocks.resolve(ISSUE_EXAMPLE, turbo_names, [module]).at(module) == want


def test_unnamed_modules_keep_one_and_star_sets_the_default(turbo_names):
    got = blocks.resolve({"layers.0-9": 0.5}, turbo_names, ["layers.12.attention.to_q", "layers.2.attention.to_q"])
    assert got.values == {"layers.12.attention.to_q": 1.0, "layers.2.attention.to_q": 0.5}
    assert got.default == 1.0
    assert blocks.resolve({"*": 0.3}, turbo_names, []).default == 0.3


def test_within_a_block_the_narrower_pattern_and_then_the_later_one_wins(turbo_names):
    m = "layers.4.attention.to_q"
    assert blocks.resolve({"layers.0-9.attention": 0.3, "layers.0-9": 0.1}, turbo_names, [m]).at(m) == 0.3
    assert blocks.resolve({"layers.4": 0.1, "layers.4-4": 0.2}, turbo_names, [m]).at(m) == 0.2
    assert blocks.resolve({"layers.4-4": 0.2, "layers.4": 0.1}, turbo_names, [m]).at(m) == 0.1


@pytest.mark.parametrize(("preset", "first", "last"), [("early", 0, 9), ("middle", 10, 19), ("late", 20, 29)])
def test_presets_are_thirds_of_the_layers(turbo_names, preset, first, last):
    mods = [f"layers.{i}.feed_forward.w1" for i in range(30)]
    got = blocks.resolve({"*": 0.0, preset: 1.0}, turbo_names, mods)
    assert [i for i, m in enumerate(mods) if got.at(m) == 1.0] == list(range(first, last + 1))


def test_kinds_and_aliases(turbo_names):
    mods = ["layers.7.adaLN_modulation.0", "all_final_layer.2-1.adaLN_modulation.1", "layers.7.attention.to_k",
            "noise_refiner.0.attention.to_v", "all_x_embedder.2-1", "cap_embedder.1"]
    got = blocks.resolve({"*": 0, "adaLN": 1, "attention": 2, "x_embedder": 3, "cap_embedder": 4}, turbo_names, mods)
    assert [got.at(m) for m in mods] == [1, 1, 2, 2, 3, 4]


@pytest.mark.parametrize(("pattern", "named"), [
    ("layer.0-9", "layers.0-9"), ("noise_refinr", "noise_refiner"), ("feedforward", "feed_forward"),
    ("layers.0-40", "0-29"),
])
def test_unknown_patterns_name_the_nearest_real_ones(turbo_names, pattern, named):
    with pytest.raises(zl.LoRAError, match=named):
        blocks.resolve({pattern: 0.5}, turbo_names, [])


@pytest.mark.parametrize("bad", [{}, {"layers.0-9": "x"}, {"layers.0-9": float("inf")}, {3: 1.0}])
def test_bad_mappings_are_refused(turbo_names, bad):
    with pytest.raises(zl.InvalidArgumentError):
        blocks.resolve(bad, turbo_names, [])


def test_cli_text_and_json_file(tmp_path):
    assert blocks.parse("layers.0-9=0.4, noise_refiner=0") == {"layers.0-9": 0.4, "noise_refiner": 0.0}
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"late": 0.5}))
    assert blocks.parse(str(path)) == {"late": 0.5}
    with pytest.raises(zl.InvalidArgumentError, match="PATTERN=NUMBER"):
        blocks.parse("layers.0-9")


# --- the engine -------------------------------------------------------------------------------------------
SPEC = {"*": 0.7, "layers.1": -0.5, "noise_refiner": 0.0, "*.feed_forward.*": 1.3}


def _groups(adapter, spec_values):
    """The adapter split by the number each module gets: (value, sub-adapter) pairs."""
    out: dict[float, list] = {}
    for t in adapter.targets:
        out.setdefault(spec_values(t.module), []).append(t)
    return [(v, dataclasses.replace(adapter, targets=ts, name=f"g{i}")) for i, (v, ts) in enumerate(out.items())]


def _reference(path, spec_values):
    """The model with the adapter as one plain-strength adapter per group of equal-strength modules."""
    model = tiny_model(0)
    adapter = load_adapter(path, model)
    for value, sub in _groups(adapter, spec_values):
        zl.apply_adapter(model, sub, scale=value, mode="merged", name=sub.name)
    return run_model(model, tiny_inputs(1))


def _by_hand(module: str) -> float:
    """SPEC on the tiny model (2 blocks, 1 refiner block), from the rules, not from the resolver."""
    if module.startswith("layers.1."):
        return -0.5
    if module.startswith("noise_refiner."):
        return 0.0
    return 1.3 if ".feed_forward." in module else 0.7


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return make_adapter("diffusers", tmp_path_factory.mktemp("b") / "a.safetensors", tiny_model(0), seed=3)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_apply_with_a_mapping_equals_split_adapters(lora_file, mode):
    model = tiny_model(0)
    zl.apply_adapter(model, lora_file, scale=SPEC, mode=mode, name="a")
    torch.testing.assert_close(run_model(model, tiny_inputs(1)), _reference(lora_file, _by_hand))
    assert zl.list_adapters(model)[0].scale == 0.7


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_reweighting_between_numbers_and_mappings(lora_file, mode):
    model = tiny_model(0)
    zl.apply_adapter(model, lora_file, scale=0.2, mode=mode, name="a")
    zl.set_adapter_scale(model, "a", SPEC)
    torch.testing.assert_close(run_model(model, tiny_inputs(1)), _reference(lora_file, _by_hand))
    zl.set_adapter_scale(model, "a", 0.9)  # back to one number: modules with their own go to it too
    torch.testing.assert_close(run_model(model, tiny_inputs(1)), _reference(lora_file, lambda m: 0.9))
    zl.Adapters(model).set_adapters(["a"], [{"layers.0": 0.25}])
    want = _reference(lora_file, lambda m: 0.25 if m.startswith("layers.0.") else 1.0)
    torch.testing.assert_close(run_model(model, tiny_inputs(1)), want)


def test_merged_rebuilds_only_the_layers_whose_strength_changed(lora_file, monkeypatch):
    model = tiny_model(0)
    zl.apply_adapter(model, lora_file, scale={"*": 0.5, "layers.0": 0.1}, mode="merged", name="a")
    rebuilt: list[str] = []
    real = merge.rebuild
    monkeypatch.setattr(merge, "rebuild", lambda name, *a: rebuilt.append(name) or real(name, *a))
    zl.set_adapter_scale(model, "a", {"*": 0.5, "layers.0": 0.2, "layers.1.attention": 0.5})
    assert rebuilt and all(n.startswith("layers.0.") for n in rebuilt)
    assert len(rebuilt) == len([t for t in load_adapter(lora_file, model).targets if t.module.startswith("layers.0.")])


def test_per_sample_specs_take_mappings(lora_file):
    model = tiny_model(0)
    zl.apply_adapter(model, lora_file, scale=1.0, name="a")
    inputs = tiny_inputs(1)
    pair = {k: (v * 2 if isinstance(v, list) else torch.cat([v, v])) for k, v in inputs.items()}
    with zl.per_sample_adapters(model, [{"a": SPEC}, {"a": 0.7}]):
        out = model(pair["x"], pair["t"], pair["cap_feats"], return_dict=False)[0]
    torch.testing.assert_close(out[0].float(), _reference(lora_file, _by_hand))
    torch.testing.assert_close(out[1].float(), _reference(lora_file, lambda m: 0.7))


def test_a_failed_change_leaves_the_strengths(lora_file):
    model = tiny_model(0)
    zl.apply_adapter(model, lora_file, scale=SPEC, name="a")
    before = run_model(model, tiny_inputs(1))
    with pytest.raises(zl.LoRAError, match="nearest"):
        zl.set_adapter_scale(model, "a", {"layers.1": 0.2, "layerz.0": 1.0})
    torch.testing.assert_close(run_model(model, tiny_inputs(1)), before, rtol=0, atol=0)


def test_inspect_prints_the_norm_per_block(lora_file, tmp_path, capsys):
    from zimage_lora.block_norms import block_norms
    from zimage_lora.cli import main
    from zimage_lora.examples import tiny_config

    model = tiny_model(0)
    adapter = load_adapter(lora_file, model)
    want: dict[str, float] = {}
    for t in adapter.targets:  # LoRA: delta = scale * up @ down, summed in squares per block
        block = t.module.split(".")[0] + ("." + t.module.split(".")[1] if t.module.startswith("layers.") else "")
        if t.module.startswith(("noise_refiner.", "context_refiner.")):
            block = ".".join(t.module.split(".")[:2])
        d = t.scale * t.tensors["up"].float() @ t.tensors["down"].float()
        want[block] = want.get(block, 0.0) + float(d.square().sum())
    got = block_norms(adapter)
    assert set(got) == set(want)
    for block, sq in want.items():
        assert got[block] == pytest.approx(sq**0.5, rel=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    assert main(["inspect", str(lora_file), "--blocks", "--model", str(tmp_path / "config.json")]) == 0
    assert "delta norm per block" in capsys.readouterr().out


def test_generate_blocks(tmp_path):
    import numpy as np
    from _tiny_pipeline import tiny_pipeline
    from PIL import Image

    from zimage_lora.tools.generate import generate

    pipe = tiny_pipeline(seed=0)
    f = make_adapter("diffusers", tmp_path / "a.safetensors", pipe.transformer, seed=2)
    args = dict(steps=2, width=32, height=32, dtype="fp32", device="cpu", seed=3, pipeline=pipe)
    base = generate("a red cat", [], out=tmp_path / "base.png", **args)
    off = generate("a red cat", [f"{f}:4"], out=tmp_path / "off.png", blocks="*=0", **args)
    some = generate("a red cat", [f"{f}:4"], out=tmp_path / "some.png", blocks={"layers.0": 1.0, "*": 0}, **args)
    a, b, c = (np.asarray(Image.open(r.out)).astype(np.int16) for r in (base, off, some))
    assert np.array_equal(a, b)  # every block at 0: exactly the base
    assert np.abs(a - c).mean() > 0.5
    with pytest.raises(zl.LoRAError, match="nearest"):
        generate("a red cat", [f"{f}:4"], out=tmp_path / "bad.png", blocks="layerz.0=1", **args)
