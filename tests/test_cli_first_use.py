"""What a new user meets on the command line: mistyped paths, inspect's counts and lists, argument
errors, short reprs, generate's missing model, notes that agree with each other."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_lora import AdapterNotFoundError, load_adapter
from zimage_lora.cli import main
from zimage_lora.examples import TINY_CONFIG, make_adapter, tiny_model
from zimage_lora.sources import parse_strength, resolve_source

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_mistyped_local_path_is_a_missing_file_with_the_nearest_names(tmp_path, monkeypatch, no_network):
    (tmp_path / "api").mkdir()
    (tmp_path / "api" / "style.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    for typo in ("api/style.safetenosrs", "api/styl"):
        with pytest.raises(AdapterNotFoundError, match=r"no such file or folder; nearest names in api: style\."):
            resolve_source(typo)


@pytest.fixture()
def cfg(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


def test_inspect_counts_linears_apart_shows_the_scale_and_all_lists_every_target(tmp_path, cfg, capsys):
    model = tiny_model()
    src = make_adapter("kohya", tmp_path / "k.safetensors", model, alpha=2.0)  # rank 4: scale 0.5
    sd = load_file(str(src))
    sd["lora_unet_layers_0_attention_norm_q.diff"] = torch.full((32,), 0.01)  # a norm: not a Linear layer
    save_file(sd, str(src))
    assert main(["inspect", str(src), "--model", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "37 of 37 Linear layers + 1 other module(s)" in out
    assert "scale at strength 1" in out and "0.5 (x37)" in out
    assert "targets" not in out  # the per-target list is --all's
    assert main(["inspect", str(src), "--model", str(cfg), "--all"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.attention.norm_q" in out and "lora_unet_layers_0_feed_forward_w2.lora_down.weight" in out


def test_argument_errors_are_one_error_line_and_exit_1(capsys):
    for argv in (["convert", "x.safetensors", "--to", "onnx", "--out", "y.safetensors"], ["inspect"], ["bogus"]):
        assert main(argv) == 1
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], captured.err
        assert "usage:" not in captured.err + captured.out


def test_no_private_error_type_reaches_a_traceback():
    with pytest.raises(Exception) as info:
        parse_strength("strong")
    assert not type(info.value).__name__.startswith("_")


def test_repr_of_an_adapter_is_short(tmp_path):
    model = tiny_model()
    adapter = load_adapter(make_adapter("kohya", tmp_path / "k.safetensors", model), model)
    assert len(repr(adapter)) < 300 and "37 targets" in repr(adapter) and "tensor(" not in repr(adapter)
    assert len(repr(adapter.targets[0])) < 200


def test_generate_without_a_cached_model_names_the_model_option(monkeypatch):
    import diffusers

    from zimage_lora import LoRAError
    from zimage_lora.tools import generate

    def fail(*a, **k):
        raise OSError("Cannot load model. Please check out the root cause in the stacktrace above.")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", fail)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(LoRAError) as info:
        generate._load_pipeline(generate.DEFAULT_MODEL, torch.bfloat16)
    text = str(info.value)
    assert "--model" in text and "stacktrace" not in text


def test_text_encoder_reason_has_a_command_line_equivalent():
    from zimage_lora.formats.text_encoder import TRANSFORMER_ONLY_REASON

    assert "zimage-lora generate" in TRANSFORMER_ONLY_REASON


def test_overlap_notes_do_not_contradict_each_other(tmp_path):
    """A mixed (Anime-Z) file whose fused copy differs from the split keys: no note calls it the same weights."""
    model = tiny_model()
    src = make_adapter("mixed", tmp_path / "m.safetensors", model)
    sd = load_file(str(src))
    for k in [k for k in sd if "attention_qkv" in k and k.endswith(".lora.up.weight")]:
        sd[k] = sd[k] * 2
    save_file(sd, str(src))
    notes = load_adapter(src, model).notes
    assert any("not a copy" in n for n in notes)
    assert not any("same weights twice" in n for n in notes)
