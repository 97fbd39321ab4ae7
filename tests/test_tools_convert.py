"""convert: every layout into every target layout gives the same weights on the tiny model; what a
layout cannot hold is refused; the PEFT output loads in PEFT itself and matches."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from zimage_lora import LoRAError, UnsupportedError, load_adapter
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, run_model, tiny_inputs, tiny_model
from zimage_lora.keys import ModuleIndex
from zimage_lora.tools.convert import convert_adapter
from zimage_lora.tools.target_math import merge_bias, merge_weight

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LORA_LAYOUTS = ["kohya", "kohya-fused", "comfy-fused", "musubi-other", "peft", "peft-dora", "mixed", "lycoris-dora"]
OTHER_LAYOUTS = ["lycoris-lokr-factorized", "lycoris-loha", "lycoris-full", "lycoris-lokr-tucker"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


@pytest.fixture(scope="module")
def index(model):
    return ModuleIndex(model)


def merged_weights(model, adapter) -> dict[str, torch.Tensor]:
    """Every weight and bias of the model with the adapter merged at strength 1.3 (fp32)."""
    plan: dict[str, list] = {}
    for t in adapter.targets:
        plan.setdefault(t.module, []).append((t, 1.3))
    out = {}
    for name, module in model.named_modules():
        if name in plan:
            out[name] = merge_weight(module.weight.detach().float().clone(), plan[name])
            if module.bias is not None:
                out[name + ".bias"] = merge_bias(module.bias.detach().float().clone(), plan[name])
    return out


def assert_same(model, a, b):
    wa, wb = merged_weights(model, a), merged_weights(model, b)
    assert wa.keys() == wb.keys()
    base = dict(model.named_parameters())
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
        if not k.endswith(".bias"):
            assert not torch.equal(wa[k], base[k + ".weight"].float())


@pytest.mark.parametrize("layout", LORA_LAYOUTS)
@pytest.mark.parametrize("to", ["diffusers", "kohya", "comfy", "peft"])
def test_lora_converts_exactly(model, index, tmp_path, layout, to):
    src = make_adapter(layout, tmp_path / ("src" if layout.startswith("peft") else "src.safetensors"), model)
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    convert_adapter(src, to, out, model=model)
    original, converted = load_adapter(src, index), load_adapter(out, index)
    assert converted.unmatched == []
    assert_same(model, original, converted)


@pytest.mark.parametrize("layout", OTHER_LAYOUTS)
def test_lycoris_algorithms_keep_their_suffixes(model, index, tmp_path, layout):
    src = make_adapter(layout, tmp_path / "src.safetensors", model)
    original = load_adapter(src, index)
    for to in ("kohya", "comfy"):
        out = convert_adapter(src, to, tmp_path / f"{to}.safetensors", model=model)
        keys = load_file(str(out)).keys()
        suffix = {"lokr": ".lokr_w1", "loha": ".hada_w1_a", "full": ".diff"}[original.algorithms[0]]
        assert any(k.endswith(suffix) for k in keys)
        assert_same(model, original, load_adapter(out, index))
    for to in ("diffusers", "peft"):
        with pytest.raises(UnsupportedError, match="kohya"):
            convert_adapter(src, to, tmp_path / f"x_{to}", model=model)
    assert not (tmp_path / "x_diffusers").exists()


def test_fused_lokr_goes_back_to_fused_qkv(model, index, tmp_path):
    """A LoKr on the fused qkv (ComfyUI) cannot be split; kohya and comfy outputs keep it fused."""
    import math

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {
        "diffusion_model.layers.1.attention.qkv.lokr_w1": torch.randn(3, 2, generator=g),
        "diffusion_model.layers.1.attention.qkv.lokr_w2": torch.randn(64, 32, generator=g) / math.sqrt(32),
    }
    src = tmp_path / "fused_lokr.safetensors"
    save_file(sd, str(src))
    original = load_adapter(src, index)
    assert [t.delta_rows for t in original.targets] == [(0, 64), (64, 128), (128, 192)]
    for to in ("kohya", "comfy"):
        out = convert_adapter(src, to, tmp_path / f"{to}.safetensors", model=model)
        assert any("attention_qkv.lokr_w1" in k or "attention.qkv.lokr_w1" in k for k in load_file(str(out)))
        assert_same(model, original, load_adapter(out, index))


def test_comfy_block_diagonal_and_shared_down(model, index, tmp_path):
    kohya = make_adapter("kohya", tmp_path / "k.safetensors", model)  # separate downs per q, k, v
    comfy = make_adapter("comfy-fused", tmp_path / "c.safetensors", model)  # one shared down
    a = load_file(str(convert_adapter(kohya, "comfy", tmp_path / "a.safetensors", model=model)))
    b = load_file(str(convert_adapter(comfy, "comfy", tmp_path / "b.safetensors", model=model)))
    key = "diffusion_model.layers.0.attention.qkv.lora_A.weight"
    assert a[key].shape == (12, 64) and b[key].shape == (4, 64)
    assert "diffusion_model.layers.0.attention.out.lora_A.weight" in a
    assert not any("to_q" in k or "to_out" in k for k in a)


def test_diffusers_metadata_and_peft_load(model, tmp_path):
    src = make_adapter("peft-dora", tmp_path / "src", model, alpha=6.0)
    out = convert_adapter(src, "diffusers", tmp_path / "d.safetensors", model=model)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert meta["lora_alpha"] == 6 and meta["r"] == 4 and meta["use_dora"] is True
    assert all(k.startswith("transformer.") for k in load_file(str(out)))
    # PEFT itself loads the converted PEFT folder and produces the merged weights' output.
    from peft import PeftModel

    # Fused qkv with separate downs: rank 12 on q/k/v, 4 elsewhere, so rank_pattern and alpha_pattern matter.
    kohya = make_adapter("kohya-fused", tmp_path / "k.safetensors", model, alpha=3.0)
    folder = convert_adapter(kohya, "peft", tmp_path / "peft_out", model=model)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["rank_pattern"]["layers.0.attention.to_q"] == 12
    assert cfg["alpha_pattern"]["layers.0.attention.to_q"] == 9
    merged = tiny_model(seed=2)
    adapter = load_adapter(kohya, model)
    plan: dict[str, list] = {}
    for t in adapter.targets:
        plan.setdefault(t.module, []).append((t, 1.0))
    with torch.no_grad():
        for name, module in merged.named_modules():
            if name in plan:
                module.weight.copy_(merge_weight(module.weight.float().clone(), plan[name]))
    peft_model = PeftModel.from_pretrained(tiny_model(seed=2), str(folder))
    inputs = tiny_inputs()
    ref, got, base = run_model(merged, inputs), run_model(peft_model, inputs), run_model(model, inputs)
    assert (ref - base).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_rslora_scale_is_kept(model, index, tmp_path):
    src = make_adapter("peft", tmp_path / "src", model, alpha=8.0)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    original = load_adapter(src, index)
    assert original.targets[0].scale == pytest.approx(8.0 / 2.0)  # alpha / sqrt(r), r = 4
    for to in ("diffusers", "kohya", "comfy", "peft"):
        out = convert_adapter(src, to, tmp_path / (to if to == "peft" else f"{to}.safetensors"), model=model)
        assert_same(model, original, load_adapter(out, index))


def test_cli_convert_and_refusal(model, tmp_path, capsys):
    from zimage_lora.examples import TINY_CONFIG

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    src = make_adapter("kohya", tmp_path / "k.safetensors", model)
    out = tmp_path / "c.safetensors"
    assert main(["convert", str(src), "--to", "comfy", "--out", str(out), "--model", str(cfg)]) == 0
    assert out.exists() and "comfy" in capsys.readouterr().out  # the summary: stdout, stderr stays empty
    assert main(["convert", str(src), "--to", "comfy", "--out", str(out), "--model", str(cfg)]) == 1
    lokr = make_adapter("lycoris-lokr", tmp_path / "l.safetensors", model)
    assert main(["convert", str(lokr), "--to", "diffusers", "--out", str(tmp_path / "x.safetensors"),
                 "--model", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "holds LoRA and DoRA only" in err and ".lokr_w1" in err
    with pytest.raises(LoRAError, match="unknown target layout"):
        convert_adapter(src, "onnx", tmp_path / "y.safetensors", model=model)


@pytest.mark.parametrize(
    "layout,to",
    [("kohya", "comfy"), ("peft-dora", "diffusers"), ("lycoris-loha", "kohya"), ("comfy-fused", "peft"),
     ("lycoris-lokr-factorized", "comfy"), ("mixed", "kohya")],
)
def test_converted_file_gives_the_same_output_through_the_engine(model, tmp_path, layout, to):
    from zimage_lora import apply_adapter, remove_adapter

    src = make_adapter(layout, tmp_path / ("src" if layout.startswith("peft") else "src.safetensors"), model)
    out = convert_adapter(src, to, tmp_path / ("out" if to == "peft" else "out.safetensors"), model=model)
    inputs = tiny_inputs()
    base = run_model(model, inputs)
    results = []
    for path in (src, out):
        for mode in ("dynamic", "merged"):
            apply_adapter(model, path, scale=0.9, mode=mode, name="x")
            results.append(run_model(model, inputs))
            remove_adapter(model, "x")
    assert torch.equal(run_model(model, inputs), base)
    effect = (results[0] - base).norm()
    assert effect > 1e-2 * base.norm()
    for r in results[1:]:
        assert (r - results[0]).norm() < 1e-4 * effect


def test_failed_convert_leaves_the_old_output_and_no_partial_file(tmp_path, monkeypatch, model):
    """A write that fails half-way (a full disk, Ctrl-C) keeps the previous output intact and leaves
    no partial file: the new file is written aside and moved in only when complete."""
    import safetensors.torch

    src = make_adapter("kohya", tmp_path / "in.safetensors", model)
    out = tmp_path / "out.safetensors"
    convert_adapter(src, "kohya", out, model=model)
    before = out.read_bytes()

    def fail(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(LoRAError, match="no space left"):
        convert_adapter(src, "kohya", out, model=model, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]

    def interrupt(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_adapter(src, "comfy", out, model=model, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors", "out.safetensors"]
