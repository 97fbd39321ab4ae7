"""generate_batch: compatible requests share one pipeline call; each image equals its request run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _tiny_pipeline import tiny_pipeline

import zimage_lora as zl
from zimage_lora.batch import groups
from zimage_lora.examples import make_adapter


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("adapters")
    p = tiny_pipeline(0)
    p.set_progress_bar_config(disable=True)
    clean = tiny_pipeline(0).transformer  # adapters are written from a model without wrappers
    for name, layout, seed in (("a", "diffusers", 1), ("b", "lycoris-lokr", 2), ("c", "lycoris-dora", 3)):
        zl.apply_adapter(p, make_adapter(layout, folder / f"{name}.safetensors", clean, seed=seed), name=name)
    yield p
    torch.set_num_threads(threads)


def alone(pipe, r: zl.Request) -> np.ndarray:
    zl.set_active_adapters(pipe, list(r.adapters), list(r.adapters.values()))
    try:
        kwargs = dict(
            prompt=r.prompt, height=r.height, width=r.width, num_inference_steps=r.steps, guidance_scale=r.guidance,
            generator=torch.Generator().manual_seed(r.seed), output_type="np",
        )
        if r.negative_prompt is not None:
            kwargs["negative_prompt"] = r.negative_prompt
        return pipe(**kwargs).images[0]
    finally:
        zl.set_active_adapters(pipe, None, [1.0, 1.0, 1.0])


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_images_equal_single_runs(pipe, guidance):
    reqs = [
        zl.Request("a red cat", seed=1, steps=2, width=32, height=32, guidance=guidance, adapters={"a": 1.0}),
        zl.Request("the sea at night", seed=2, steps=2, width=32, height=32, guidance=guidance,
                   adapters={"b": 0.7, "c": 1.0}),
        zl.Request("a tree", seed=3, steps=2, width=32, height=32, guidance=guidance),
        zl.Request("a dog", seed=4, steps=2, width=48, height=32, guidance=guidance, adapters={"a": -0.5},
                   negative_prompt="blue"),
        zl.Request("a house", seed=5, steps=2, width=32, height=32, guidance=guidance, adapters={"c": 1.0},
                   negative_prompt="green sky"),
    ]
    calls: list[int] = []
    hook = pipe.transformer.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    try:
        got = zl.generate_batch(pipe, reqs, output_type="np")
    finally:
        hook.remove()
    per_sample = 2 if guidance > 1 else 1  # the pipeline doubles the batch under guidance
    assert sorted(set(calls)) == sorted({4 * per_sample, 1 * per_sample}), calls  # two calls: 4 + 1 requests
    base = alone(pipe, zl.Request("a red cat", seed=1, steps=2, width=32, height=32, guidance=guidance))
    assert np.abs(alone(pipe, reqs[0]) - base).max() > 1e-2  # the adapters visibly change the image
    for r, image in zip(reqs, got, strict=True):
        np.testing.assert_allclose(image, alone(pipe, r), atol=1e-4, rtol=0)


def test_groups_by_settings_and_max_batch_size():
    r = lambda steps, w: zl.Request("x", steps=steps, width=w, height=32)  # noqa: E731
    reqs = [r(2, 32), r(3, 32), r(2, 32), r(2, 48), r(2, 32), r(2, 32)]
    assert groups(reqs) == [[0, 2, 4, 5], [1], [3]]
    assert groups(reqs, max_batch_size=3) == [[0, 2, 4], [5], [1], [3]]


def test_bad_requests_are_errors(pipe):
    with pytest.raises(zl.LoRAError, match="steps must be in"):
        zl.generate_batch(pipe, [zl.Request("x", steps=0)])
    with pytest.raises(zl.LoRAError, match="prompt must be"):
        zl.generate_batch(pipe, [zl.Request("")])
    with pytest.raises(zl.LoRAError, match="not attached"):
        zl.generate_batch(pipe, [zl.Request("x", steps=1, width=32, height=32, adapters={"zz": 1.0})])
    assert [a.active for a in zl.list_adapters(pipe)] == [True, True, True]
