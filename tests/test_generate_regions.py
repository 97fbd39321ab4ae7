"""`generate --region`: an adapter confined to a box or a mask image, on a tiny pipeline. Expected images
come from runs without regions: a region covering everything is the plain adapter run, an all-black
mask with caption weight 0 is the base run."""

from __future__ import annotations

import numpy as np
import pytest
from _tiny_pipeline import tiny_pipeline
from PIL import Image

import zimage_lora as zl
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter
from zimage_lora.tools.generate import generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe_and_file(tmp_path_factory):
    pipe = tiny_pipeline(seed=0)
    f = make_adapter("diffusers", tmp_path_factory.mktemp("a") / "a.safetensors", pipe.transformer, seed=2)
    return pipe, f


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(result.out)).astype(np.int16)


def test_a_region_confines_the_adapter(pipe_and_file, tmp_path):
    pipe, f = pipe_and_file
    args = dict(steps=2, width=32, height=32, dtype="fp32", device="cpu", seed=3, pipeline=pipe)
    base = _pixels(generate("a red cat", [], out=tmp_path / "base.png", **args))
    full = _pixels(generate("a red cat", [f"{f}:4"], out=tmp_path / "full.png", **args))
    everywhere = _pixels(generate("a red cat", [f"{f}:4"], out=tmp_path / "all.png", regions=["1=0,0,1,1"], **args))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black.png")
    nowhere = _pixels(generate("a red cat", [f"{f}:4"], out=tmp_path / "none.png", regions=[f"1={tmp_path}/black.png"],
                               region_caption=0, **args))
    left = _pixels(generate("a red cat", [f"{f}:4"], out=tmp_path / "left.png", regions={1: (0.0, 0.0, 0.5, 1.0)},
                            **args))
    assert np.abs(full - base).mean() > 0.5, "the adapter must visibly change the image"
    assert np.abs(everywhere - full).max() <= 1  # same math up to one 8-bit level
    assert np.array_equal(nowhere, base)
    assert np.abs(left - full).mean() > 0.1 and np.abs(left - base).mean() > 0.1
    assert zl.list_adapters(pipe) == []


@pytest.mark.parametrize(("regions", "mode", "match"), [
    (["2=0,0,1,1"], "dynamic", "position among the --lora options, 1 to 1"),
    (["1=0,0,1"], "dynamic", "neither a box"),
    (["x=0,0,1,1"], "dynamic", "expected N=x0,y0,x1,y1"),
    (["1=0.5,0,0.2,1"], "dynamic", "0 <= x0 < x1 <= 1"),
    (["1=0,0,1,1", "1=0,0,.5,1"], "dynamic", "given twice"),
    (["1=0,0,1,1"], "merged", "needs --mode dynamic"),
])
def test_bad_regions_are_refused_before_loading(tmp_path, regions, mode, match):
    with pytest.raises(zl.LoRAError, match=match):
        generate("a cat", [str(tmp_path / "a.safetensors")], out=tmp_path / "x.png", regions=regions, mode=mode,
                 model=str(tmp_path / "no-model"))


def test_the_command_line_answers_one_error_line(tmp_path, capsys):
    code = main(["generate", "--prompt", "a cat", "--lora", str(tmp_path / "a.safetensors"), "--region", "3=0,0,1,1",
                 "--region-caption", "nan", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error:")
