"""Per-block strengths, schedules and regions in serve's request JSON, without Ray: validated before a
batch, and each request of a mixed batch equal to the Python API run alone with the same settings."""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch
from _tiny_pipeline import tiny_pipeline
from test_serving_core import pixels, same_image

import zimage_lora as zl
from zimage_lora.examples import make_adapter
from zimage_lora.serving.core import Engine, ServeOptions, http_status, parse_job, png_bytes
from zimage_lora.serving.parse import parse_openai

BLOCKS = {"*": 0.9, "layers.1": 0.3, "noise_refiner": 0}
SOFT = [[0.0, 0.25, 0.5, 1.0]] * 2 + [[1.0, 1.0, 0.5, 0.0]] * 2  # a 4x4 mask, area-averaged onto the tokens


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    model = tiny_pipeline(0).transformer
    make_adapter("diffusers", root / "style.safetensors", model, seed=1)
    make_adapter("lycoris-lokr", root / "kr.safetensors", model, seed=2)
    return root


@pytest.fixture(scope="module")
def engine(adapters):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(ServeOptions(model="tiny", dtype="fp32", device="cpu", roots=[str(adapters)]), tiny_pipeline(0))
    torch.set_num_threads(threads)


def request(prompt: str, seed: int, loras: list[dict], guidance: float) -> dict:
    return {"prompt": prompt, "seed": seed, "steps": 3, "width": 32, "height": 32, "guidance": guidance,
            "loras": loras}


def python_api(adapters, b: dict) -> bytes:
    """The same image through the public Python API on a fresh pipeline: adapters attached with their
    (per-block) strengths, `zl.schedule` and `zl.regional_adapters` around one pipeline call."""
    pipe = tiny_pipeline(0)
    schedules, regions = {}, {}
    for i, lora in enumerate(b["loras"]):
        name = f"a{i}"
        zl.apply_adapter(pipe.transformer, adapters / lora["source"], name=name, scale=lora.get("strength", 1.0),
                         mode="dynamic")
        if "schedule" in lora:
            schedules[name] = [tuple(p) for p in lora["schedule"]]
        if "region" in lora:
            box = lora["region"].get("box")
            regions[name] = tuple(box) if box else torch.tensor(lora["region"]["mask"])
    with ExitStack() as stack:
        if schedules:
            stack.enter_context(zl.schedule(pipe, schedules))
        if regions:
            stack.enter_context(zl.regional_adapters(pipe, regions))
        pipe.set_progress_bar_config(disable=True)
        image = pipe(b["prompt"], height=b["height"], width=b["width"], num_inference_steps=b["steps"],
                     guidance_scale=b["guidance"], generator=torch.Generator("cpu").manual_seed(b["seed"])).images[0]
    return png_bytes(image)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_each_request_its_own_blocks_schedule_and_regions_in_one_batch(engine, adapters, guidance):
    bodies = [
        request("a red cat", 1, [{"source": "style.safetensors", "strength": BLOCKS}], guidance),
        request("the sea", 2, [{"source": "style.safetensors", "strength": 0.8, "schedule": [[0, 1], [0.5, 0.2]]},
                               {"source": "kr.safetensors", "region": {"box": [0, 0, 0.5, 1]}}], guidance),
        request("a tree", 3, [{"source": "kr.safetensors", "strength": 0.7, "region": {"mask": SOFT}},
                              {"source": "style.safetensors", "strength": BLOCKS, "schedule": [[0, 0.5], [1, 1.5]]}],
                guidance),
        request("a dog", 4, [{"source": "style.safetensors", "strength": 0.5}], guidance),
    ]
    jobs = [parse_job(b) for b in bodies]
    for job in jobs:
        engine.check(job)
    results = engine.run(jobs)
    assert engine.largest_batch >= 4 and engine.retried_batches == 0  # one shared batch, nothing rerun alone
    for b, png in zip(bodies, results, strict=True):
        assert isinstance(png, bytes), png
        same_image(png, python_api(adapters, b))
    # Each setting changed the image it applies to (the comparisons above are not between no-ops).
    for i, k, changed in ((0, 0, {"strength": 0.9}), (1, 1, {"region": None}), (2, 0, {"region": None}),
                          (2, 1, {"schedule": None})):
        loras = [dict(x) for x in bodies[i]["loras"]]
        loras[k] = {key: v for key, v in {**loras[k], **changed}.items() if v is not None}
        (png,) = engine.run([parse_job({**bodies[i], "loras": loras})])
        assert abs(pixels(png) - pixels(results[i])).max() > 2, (i, changed)


def test_the_model_refuses_unknown_block_patterns_before_a_batch(engine):
    job = parse_job(request("x", 1, [{"source": "style.safetensors", "strength": {"layer.0-1": 0.5}}], 0.0))
    with pytest.raises(zl.LoRAError, match="nearest: layers") as info:
        engine.check(job)
    assert http_status(info.value) == 422 and "'layer.0-1'" in str(info.value)
    engine.check(parse_job(request("x", 1, [{"source": "style.safetensors", "strength": {"late": 2.0}}], 0.0)))


def test_parse_checks_blocks_schedules_and_regions():
    job = parse_job(request("x", 1, [{"source": "a", "strength": {"*": 0.5}, "schedule": [[0, 1], [1, 0]],
                                      "region": {"box": [0, 0, 0.5, 1]}}], 0.0))
    assert job.loras == (("a", {"*": 0.5}),) and job.schedules == (("a", ((0.0, 1.0), (1.0, 0.0))),)
    assert job.regions == (("a", (0.0, 0.0, 0.5, 1.0)),)
    (first, second) = parse_openai({"prompt": "x", "n": 2, "size": "32x32",
                                    "loras": [{"source": "a", "region": {"mask": [[0, 1]]}}]})
    assert first.regions == second.regions == (("a", [[0.0, 1.0]]),) and second.request.seed == 1
    bad = [
        ({"strength": {}}, "1 to 32"),
        ({"strength": {"*": 1e9}}, "within"),
        ({"strength": {"": 1}}, "non-empty string"),
        ({"schedule": [[1.5, 1]]}, r"\[0, 1\]"),
        ({"schedule": [[0.5, 1], [0.2, 1]]}, "increase"),
        ({"schedule": [[i / 20, 1] for i in range(20)]}, "at most 16"),
        ({"schedule": "0:1"}, "list of"),
        ({"region": {"box": [0.5, 0, 0.2, 1]}}, "x0 < x1"),
        ({"region": {"box": [0, 0, 1]}}, "box must be"),
        ({"region": {"mask": [[0.5] * 65]}}, "64x64"),
        ({"region": {"mask": [[0.5, 1], [1]]}}, "rectangular"),
        ({"region": {"mask": [[2.0]]}}, r"\[0, 1\]"),
        ({"region": {"circle": 1}}, "box"),
    ]
    for extra, message in bad:
        with pytest.raises(zl.InvalidFormatError, match=message):
            parse_job(request("x", 1, [{"source": "a", **extra}], 0.0))
    with pytest.raises(zl.InvalidFormatError, match="given twice"):
        parse_job(request("x", 1, [{"source": "a", "schedule": [[0, 1]]}, {"source": "a"}], 0.0))
    parse_job(request("x", 1, [{"source": "a", "strength": 0.5}, {"source": "a"}], 0.0))  # numbers add up
