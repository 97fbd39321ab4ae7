"""combine / resize of inputs whose delta depends on the base weight (DoRA, OFT, IA3), given the base as a
torch model or as a checkpoint folder; the engine's own stack of the inputs is the reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import LoRAError, apply_adapter
from zimage_lora.arithmetic import combine, resize
from zimage_lora.arithmetic.combine import combine_report
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    g = torch.Generator().manual_seed(11)
    oft, ia3 = {}, {}
    for name in ("layers.0.attention.to_q", "layers.1.feed_forward.w2", "context_refiner.0.attention.to_out.0"):
        w = model.get_submodule(name).weight
        stem = "lycoris_" + name.replace(".", "_")
        oft[stem + ".oft_blocks"] = torch.randn(w.shape[0] // 8, 8, 8, generator=g) * 0.2
        oft[stem + ".alpha"] = torch.tensor(0.0)
        ia3[stem + ".weight"] = torch.rand(w.shape[0], generator=g)
        ia3[stem + ".on_input"] = torch.tensor(0)
    meta = {"ss_network_module": "lycoris.kohya"}
    save_file(oft, str(root / "oft.safetensors"), metadata=meta)
    save_file(ia3, str(root / "ia3.safetensors"), metadata=meta)
    folder = root / "base"
    model.save_pretrained(str(folder))  # a diffusers transformer folder, as `merge` reads it
    return {"dora": make_adapter("lycoris-dora", root / "dora.safetensors", model, rank=2, seed=7),
            "lora": make_adapter("kohya", root / "lora.safetensors", model, rank=4, alpha=2.0, seed=1),
            "oft": root / "oft.safetensors", "ia3": root / "ia3.safetensors", "base": folder}


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(".weight") and v.dim() == 2}


def _stacked(model, specs) -> dict[str, torch.Tensor]:
    """The engine merging every input at its strength, in order (weight-dependent ones first, so each
    sees the base weight), on a copy of the model."""
    m = copy.deepcopy(model)
    for i, (src, s) in enumerate(specs):
        apply_adapter(m, src, scale=s, mode="merged", name=f"in{i}")
    return _weights(m)


def _rel(adapter, model, specs) -> float:
    """||applied - stacked|| / ||stacked - base|| over every weight."""
    m = copy.deepcopy(model)
    apply_adapter(m, adapter, mode="merged", name="combined")
    got, want, base = _weights(m), _stacked(model, specs), _weights(model)
    num = sum(float((got[k] - want[k]).norm()) ** 2 for k in base)
    den = sum(float((want[k] - base[k]).norm()) ** 2 for k in base)
    assert den > 1e-3
    return (num / den) ** 0.5


def test_combining_dora_with_a_lora_equals_stacking_them(model, files):
    specs = [(files["dora"], 0.8), (files["lora"], 0.6)]
    exact = combine(specs, model=model, rank=4096)  # every singular value kept
    assert _rel(exact, model, specs) < 1e-5
    adapter, report = combine_report(specs, model=model, rank=2)
    assert 0.01 < report.error < 1  # truncated: the error is what is lost ...
    assert _rel(adapter, model, specs) == pytest.approx(report.error, rel=1e-3)  # ... and exactly that


@pytest.mark.parametrize("kind", ["dora", "oft"])
def test_the_base_may_be_a_checkpoint_folder(model, files, kind):
    specs = [(files[kind], 0.8), (files["lora"], -0.5)]
    from_folder = combine(specs, model=str(files["base"]), rank=4096)
    assert _rel(from_folder, model, specs) < 1e-5
    ours = {t.module: t.tensors["up"] @ t.tensors["down"] for t in combine(specs, model=model, rank=4096).targets}
    for t in from_folder.targets:
        torch.testing.assert_close(t.tensors["up"] @ t.tensors["down"], ours[t.module], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["oft", "ia3"])
def test_resize_of_a_weight_dependent_adapter(model, files, kind):
    assert _rel(resize(files[kind], model=model, rank=4096), model, [(files[kind], 1.0)]) < 1e-5


def test_without_weights_the_refusal_names_the_flag(model, files, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model.config)))
    for kind, what in (("dora", "DoRA"), ("oft", "OFT"), ("ia3", "IA3")):
        with pytest.raises(LoRAError, match=rf"{kind}\.safetensors: module \S+ holds a {what} delta, which depends "
                                            r"on the base weight; give the base model: --model"):
            combine([files["lora"], files[kind]], model=str(config), rank=2)
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(files["oft"]), "--rank", "4", "--model", str(config), "--out", str(out)]) == 1
    assert main(["resize", str(files["oft"]), "--rank", "4", "--model", str(files["base"]), "--out", str(out),
                 "--quiet"]) == 0


@pytest.mark.parametrize("to", ["comfyui", "kohya-comfyui", "musubi", "diffusers", "peft", "ai-toolkit"])
def test_every_output_layout_records_the_inputs(model, files, tmp_path, to):
    """The metadata of issue 22 (inputs with sha256, strengths, method, rank, error) in every layout,
    the PEFT folder's adapter_model.safetensors included."""
    import hashlib

    from safetensors import safe_open

    from zimage_lora.arithmetic import save

    adapter = combine([(files["dora"], 0.8), (files["lora"], -0.5)], model=model, rank=3)
    out = save(adapter, tmp_path / ("out" if to == "peft" else "out.safetensors"), to=to)
    with safe_open(str(out / "adapter_model.safetensors" if to == "peft" else out), "pt") as f:
        meta = f.metadata()
    doc = json.loads(meta["zimage_lora_arithmetic"])
    assert [(i["file"], i["strength"]) for i in doc["inputs"]] == [(str(files["dora"]), 0.8),
                                                                   (str(files["lora"]), -0.5)]
    assert [i["sha256"] for i in doc["inputs"]] == [hashlib.sha256(p.read_bytes()).hexdigest()
                                                    for p in (files["dora"], files["lora"])]
    assert doc["method"] == "concat" and doc["rule"] == {"rank": 3} and 0 < doc["error"] < 1
    assert set(json.loads(meta["zimage_lora_errors"])) == {t.module for t in adapter.targets}
