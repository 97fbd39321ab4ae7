"""The serving core without Ray: request parsing, and a mixed batch to PNGs equal to `generate`'s."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from _tiny_pipeline import tiny_pipeline

import zimage_lora as zl
from zimage_lora.examples import make_adapter
from zimage_lora.serving.core import Engine, ServeOptions, http_status, parse_job
from zimage_lora.tools.generate import generate


def pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def same_image(a: bytes, b: bytes) -> None:
    """Equal up to one 8-bit level where a value sits on a rounding boundary (batched fp32 sums differ
    from single ones in the last bits)."""
    pa, pb = pixels(a), pixels(b)
    assert pa.shape == pb.shape
    diff = np.abs(pa - pb)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    model = tiny_pipeline(0).transformer
    make_adapter("diffusers", root / "style.safetensors", model, seed=1)
    make_adapter("lycoris-lokr", root / "kr.safetensors", model, seed=2)
    (root / "broken.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def engine(adapters):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(ServeOptions(model="tiny", dtype="fp32", device="cpu", roots=[str(adapters)]), tiny_pipeline(0))
    torch.set_num_threads(threads)


def test_parse_job_validates_every_field():
    job = parse_job({"prompt": "a cat", "seed": 3, "steps": 2, "width": 32, "height": 48, "guidance": 1.5,
                     "loras": [{"source": "a.safetensors", "strength": 0.5}, {"source": "b"}]})
    assert job.request.width == 32 and job.loras == (("a.safetensors", 0.5), ("b", 1.0))
    bad = [
        ([], "JSON object"),
        ({"prompt": ""}, "'prompt'"),
        ({"prompt": "x", "steps": 0}, "'steps'"),
        ({"prompt": "x", "steps": True}, "'steps'"),
        ({"prompt": "x", "width": 40}, "multiple of 16"),
        ({"prompt": "x", "width": 10**6}, "'width'"),
        ({"prompt": "x", "guidance": float("inf")}, "'guidance'"),
        ({"prompt": "x", "loras": [{"source": 3}]}, r"loras\[0\]"),
        ({"prompt": "x", "loras": [{"source": "a", "strength": "big"}]}, "strength"),
        ({"prompt": "x", "loras": [{"source": "a", "path": "/etc"}]}, r"loras\[0\]"),
        ({"prompt": "x", "extra": 1}, "unknown fields"),
    ]
    for body, message in bad:
        with pytest.raises(zl.InvalidFormatError, match=message):
            parse_job(body)
    assert http_status(zl.InvalidFormatError("x")) == 400
    assert http_status(zl.UnsafeFileError("x")) == 403
    assert http_status(zl.AdapterNotFoundError("x")) == 404


def body(prompt: str, seed: int, loras=(), guidance: float = 0.0) -> dict:
    return {"prompt": prompt, "seed": seed, "steps": 2, "width": 32, "height": 32, "guidance": guidance,
            "loras": [{"source": s, "strength": w} for s, w in loras]}


def reference(tmp_path, adapters, b: dict) -> bytes:
    """What `zimage-lora generate` writes for the same arguments (on a fresh pipeline of its own)."""
    out = tmp_path / f"ref{b['seed']}.png"
    loras = [f"{adapters / s}:{w}" for s, w in ((x["source"], x["strength"]) for x in b["loras"])]
    generate(b["prompt"], loras, out=out, steps=b["steps"], width=b["width"], height=b["height"], seed=b["seed"],
             guidance=b["guidance"], dtype="fp32", device="cpu", pipeline=tiny_pipeline(0))
    return out.read_bytes()


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_mixed_batch_equals_generate_and_failures_stay_alone(engine, adapters, tmp_path, guidance):
    bodies = [
        body("a red cat", 1, [("style.safetensors", 0.8)], guidance),
        body("the sea", 2, [("kr.safetensors", 1.0), ("style.safetensors", -0.5)], guidance),
        body("a tree", 3, [], guidance),
        body("a dog", 4, [("broken.safetensors", 1.0)], guidance),
        body("a house", 5, [("../outside.safetensors", 1.0)], guidance),
        body("a photo", 6, [("missing.safetensors", 1.0)], guidance),
    ]
    results = engine.run([parse_job(b) for b in bodies])
    assert isinstance(results[3], zl.InvalidFormatError), results[3]
    assert isinstance(results[4], zl.UnsafeFileError), results[4]
    assert isinstance(results[5], zl.AdapterNotFoundError), results[5]
    for b, png in zip(bodies[:3], results[:3], strict=True):
        assert isinstance(png, bytes) and png[:8] == b"\x89PNG\r\n\x1a\n"
        same_image(png, reference(tmp_path, adapters, b))
    plain = engine.run([parse_job(body("a red cat", 1, [], guidance))])[0]
    assert np.abs(pixels(results[0]) - pixels(plain)).max() > 8  # the adapter visibly changed the image


def test_cli_serve_rejects_bad_arguments_with_one_error_line(capsys):
    from zimage_lora.cli import main

    assert main(["serve", "--model", "m", "--replicas", "0"]) == 1  # checked before anything starts
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_serve_missing_lora_root_is_one_error_line(capsys, tmp_path):
    pytest.importorskip("ray.serve", reason="Ray Serve (the [serve] extra) is not installed")
    from zimage_lora.cli import main

    assert main(["serve", "--model", "m", "--lora-root", str(tmp_path / "none")]) == 1  # before Ray starts
    err = capsys.readouterr().err
    assert "adapter root is not a folder" in err and err.count("\n") == 1
