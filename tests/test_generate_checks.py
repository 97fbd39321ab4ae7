"""`generate` refuses what it can check before loading the pipeline: each case is one `error:` line
with the fix, exit code 1, no traceback, and the pipeline loader is never called (a tripwire)."""

from __future__ import annotations

import json

import pytest
import torch
from _hostile import pickle_file

from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.tools import generate as gen

pytestmark = pytest.mark.usefixtures("no_network")

ARGS = ["--steps", "2", "--width", "32", "--height", "32", "--dtype", "fp32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gencheck")
    pipe = root / "pipe"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "transformer").mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    (pipe / "transformer" / "config.json").write_text("{}")
    # Z-Image-Turbo's VAE has 4 blocks: sizes must be multiples of 2 * 2**3 = 16.
    (pipe / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    lora = make_adapter("kohya", root / "style.safetensors", tiny_model(seed=0), rank=4)
    return root, pipe, lora


@pytest.fixture(autouse=True)
def no_pipeline(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(gen, "load_pipeline", tripwire)


def _refused(capsys, files, *extra, model=None, out=None):
    root, pipe, _lora = files
    out = out or root / "img.png"
    argv = ["generate", "--prompt", "a cat", "--model", str(model or pipe), "--out", str(out), *ARGS, *extra]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("tail,excerpt", [
    ("nan", "bad strength 'nan'"), ("inf", "bad strength 'inf'"), ("abc", "bad strength 'abc'"),
    ("1e39", "bad strength '1e39'"),
])
def test_bad_lora_strength(files, capsys, tail, excerpt):
    assert excerpt in _refused(capsys, files, "--lora", f"{files[2]}:{tail}")


def test_missing_and_pickled_adapters(files, capsys, tmp_path):
    root = files[0]
    assert "no such file or folder" in _refused(capsys, files, "--lora", str(root / "absent.safetensors"))
    ckpt = pickle_file(tmp_path / "a.ckpt", tmp_path / "MARKER")
    assert "pickle-based" in _refused(capsys, files, "--lora", str(ckpt))
    assert not (tmp_path / "MARKER").exists()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x05")
    assert "too short for a safetensors header" in _refused(capsys, files, "--lora", str(broken))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(files, capsys):
    err = _refused(capsys, files, "--device", "cuda")
    assert "CUDA is not available here" in err and "Use --device cpu" in err


def test_unknown_device(files, capsys):
    assert "is not a device torch knows" in _refused(capsys, files, "--device", "gpu0")


@pytest.mark.parametrize("flag,value,excerpt", [
    ("--width", "1000", "--width 1000: this model takes sizes that are multiples of 16 (at least 16); "
                        "try --width 992 or 1008"),
    ("--height", "8", "--height 8: this model takes sizes that are multiples of 16"),
    ("--steps", "0", "--steps must be at least 1"),
])
def test_sizes_the_model_cannot_take(files, capsys, flag, value, excerpt):
    assert excerpt in _refused(capsys, files, flag, value)


def test_missing_model_folder(files, capsys, tmp_path):
    err = _refused(capsys, files, model=tmp_path / "nope")
    assert "does not exist. Pass a diffusers pipeline folder (the one holding model_index.json" in err


def test_component_folder_instead_of_the_pipeline(files, capsys):
    pipe = files[1]
    err = _refused(capsys, files, model=pipe / "transformer")
    assert "no model_index.json, so not a diffusers pipeline folder." in err
    assert f"It looks like one component of a pipeline: pass {pipe}" in err


def test_hub_model_not_cached_offline(files, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = _refused(capsys, files, model="org/absent-model")
    assert "not in the Hugging Face cache and HF_HUB_OFFLINE is set" in err and "hf download org/absent-model" in err


def test_out_is_not_overwritten(files, capsys, tmp_path):
    out = tmp_path / "exists.png"
    out.write_bytes(b"keep me")
    assert "already exists; choose another --out or pass --overwrite" in _refused(capsys, files, out=out)
    assert out.read_bytes() == b"keep me"
    assert "is not an existing folder. Create it first" in _refused(capsys, files, out=tmp_path / "no" / "x.png")
    assert "not an image type Pillow can write" in _refused(capsys, files, out=tmp_path / "x.safetensors")


def test_filename_and_revision_go_to_the_one_adapter(files, capsys, monkeypatch, tmp_path):
    from zimage_lora import sources

    calls = []

    def fake_download(**kwargs):
        calls.append(kwargs)
        return str(files[2])

    monkeypatch.setattr(sources, "_hf_hub_download", fake_download)
    # Past the adapter checks, the tripwire stops the run at the pipeline: the download got both values.
    with pytest.raises(AssertionError, match="the pipeline was loaded"):
        main(["generate", "--prompt", "x", "--model", str(files[1]), "--out", str(tmp_path / "a.png"), *ARGS,
              "--lora", "org/loras", "--filename", "style.safetensors", "--revision", "v2"])
    assert calls == [{"repo_id": "org/loras", "filename": "style.safetensors", "revision": "v2"}]
    err = _refused(capsys, files, "--lora", "a/b", "--lora", "c/d", "--filename", "x.safetensors")
    assert "--filename / --revision apply to one --lora, and 2 were given" in err


def test_the_image_is_written_aside_then_moved_in(tmp_path, monkeypatch):
    from PIL import Image

    from zimage_lora.tools import output

    out = tmp_path / "img.png"
    out.write_bytes(b"old")
    gen._save(Image.new("RGB", (4, 4)), out)
    assert Image.open(out).size == (4, 4) and sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(output.os, "replace", full)
    with pytest.raises(output.OutputError, match="no space left on the disk holding"):
        gen._save(Image.new("RGB", (8, 8)), out)
    assert Image.open(out).size == (4, 4) and sorted(p.name for p in tmp_path.iterdir()) == ["img.png"]
