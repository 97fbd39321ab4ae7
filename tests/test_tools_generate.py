"""generate, end to end on a tiny random ZImagePipeline saved to disk at test time (offline)."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_pipeline import save_tiny_pipeline
from PIL import Image

from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ARGS = ["--steps", "2", "--width", "32", "--height", "32", "--dtype", "fp32", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    pipe = save_tiny_pipeline(root / "pipe")
    lora = make_adapter("kohya", root / "style.safetensors", tiny_model(seed=0), rank=4, alpha=8.0)
    return root, pipe, lora


def _gen(root, pipe, name, *extra, capsys=None):
    out = root / f"{name}.png"
    argv = ["generate", "--prompt", "a red cat at dusk", "--model", str(pipe), "--seed", "3", "--out", str(out)]
    assert main(argv + ARGS + list(extra)) == 0
    if capsys is not None:  # the summary is stdout; stderr stays empty on success
        captured = capsys.readouterr()
        assert captured.err == "" and f"wrote {out}" in captured.out
    return np.asarray(Image.open(out)).astype(np.int16)


def test_adapter_changes_the_image_and_modes_agree(setup, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, pipe, lora = setup
    base = _gen(root, pipe, "base", capsys=capsys)
    assert base.shape == (32, 32, 3)
    again = _gen(root, pipe, "base_again")
    assert np.array_equal(base, again)  # seeded: the comparison below is about the adapter
    dynamic = _gen(root, pipe, "dynamic", "--lora", f"{lora}:1.5", capsys=capsys)
    merged = _gen(root, pipe, "merged", "--lora", f"{lora}:1.5", "--mode", "merged")
    assert np.abs(dynamic - base).mean() > 1.0
    assert np.abs(dynamic - merged).max() <= 2
    # Strength 0 is the base image pixel for pixel in both modes: the delta is scaled to exactly zero.
    for mode in ("dynamic", "merged"):
        zero = _gen(root, pipe, f"zero_{mode}", "--lora", f"{lora}:0", "--mode", mode)
        assert np.array_equal(zero, base), mode


def test_quantized_transformer_with_adapter(setup):
    pytest.importorskip("torchao")  # the optional 'quant' extra
    root, pipe, lora = setup
    image = _gen(root, pipe, "int8", "--lora", str(lora), "--quantize", "int8")
    assert image.shape == (32, 32, 3)
    # The adapter acts on the quantized transformer: same seed without it, the image differs far more
    # than int8's own noise (int8 base against the fp32 base: a mean of about 0.4 of 255 here; the
    # adapter moves pixels by about 30).
    base = _gen(root, pipe, "int8_base", "--quantize", "int8")
    noise = np.abs(base - _gen(root, pipe, "fp32_base")).mean()
    assert np.abs(image - base).mean() > max(10 * noise, 5.0)
    # Strength 0 is the int8 base image pixel for pixel (the dynamic delta is scaled to exactly zero).
    zero = _gen(root, pipe, "int8_zero", "--lora", f"{lora}:0", "--quantize", "int8")
    assert np.array_equal(zero, base)


def test_missing_model_is_a_clear_error(setup, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root, _pipe, _lora = setup
    argv = ["generate", "--prompt", "x", "--model", str(root / "nope"), "--out", str(root / "x.png")] + ARGS
    assert main(argv) == 1
    assert "does not exist. Pass a diffusers pipeline folder" in capsys.readouterr().err
