"""Per-step schedules: the strength each denoising step's transformer forward actually runs at (read
by a forward hook), the caller's callback still composed, the strengths put back afterwards; and no
recompile of a compiled model when per-block strengths change."""

from __future__ import annotations

import pytest
import torch
from _tiny_pipeline import tiny_pipeline

import zimage_lora as zl
from zimage_lora.apply.access import attached
from zimage_lora.examples import make_adapter
from zimage_lora.scheduling import check_points, factor_at, parse

POINTS = ((0.0, 1.0), (0.6, 0.3))


@pytest.mark.parametrize(("fraction", "linear", "step"), [
    (0.0, 1.0, 1.0), (0.3, 0.65, 1.0), (0.6, 0.3, 0.3), (0.9, 0.3, 0.3), (1.0, 0.3, 0.3),
])
def test_interpolation(fraction, linear, step):
    assert factor_at(POINTS, fraction) == pytest.approx(linear)
    assert factor_at(POINTS, fraction, "step") == step
    assert factor_at(((0.5, 2.0),), 0.1) == 2.0  # before the first point: the first factor


@pytest.mark.parametrize("bad", [[], [(0.5, 1.0), (0.2, 1.0)], [(1.5, 1.0)], [(0, float("nan"))], "0:1"])
def test_bad_schedules(bad):
    with pytest.raises(zl.InvalidArgumentError):
        check_points(bad)


def test_cli_text():
    assert parse("0:1.0, 0.6:0.3") == POINTS
    with pytest.raises(zl.InvalidArgumentError, match="FRACTION:FACTOR"):
        parse("0=1")


@pytest.fixture()
def pipe_and_file(tmp_path):
    pipe = tiny_pipeline(seed=0)
    f = make_adapter("diffusers", tmp_path / "a.safetensors", pipe.transformer, seed=2)
    return pipe, f


def _spy(pipe, name="style"):
    """The strength (as the engine keeps it) of every transformer forward."""
    seen: list = []
    pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(attached(m, name).strength.get()))
    return seen


def _call(pipe, **kw):
    g = torch.Generator().manual_seed(3)
    return pipe("a red cat", height=32, width=32, num_inference_steps=4, guidance_scale=0.0, generator=g,
                output_type="latent", **kw).images


def test_each_step_runs_at_its_scheduled_strength(pipe_and_file):
    pipe, f = pipe_and_file
    zl.apply_adapter(pipe, f, scale=0.8, name="style")
    seen = _spy(pipe)
    steps: list[int] = []

    def user(p, i, t, kw):
        steps.append(i)
        return kw

    with zl.schedule(pipe, {"style": [(0.0, 1.0), (0.5, 0.0)]}, interpolation="step"):
        _call(pipe, callback_on_step_end=user)
    assert seen == [0.8, 0.8, 0.0, 0.0]
    assert steps == [0, 1, 2, 3]  # the caller's callback ran at every step
    assert zl.list_adapters(pipe)[0].scale == 0.8 and type(pipe).__call__ is not None
    assert type(pipe).__name__ == "ZImagePipeline" and not hasattr(type(pipe), "_zimage_lora_scheduled")
    seen.clear()
    with zl.schedule(pipe, {"style": POINTS}):
        _call(pipe)
    assert seen == pytest.approx([0.8 * factor_at(POINTS, i / 4) for i in range(4)])


def test_a_constant_schedule_equals_the_plain_run(pipe_and_file):
    pipe, f = pipe_and_file
    zl.apply_adapter(pipe, f, scale=1.0, name="style")
    zl.set_adapter_scale(pipe.transformer, "style", 0.5)
    plain = _call(pipe)
    zl.set_adapter_scale(pipe.transformer, "style", 1.0)
    with zl.schedule(pipe, {"style": [(0.0, 0.5)]}):
        scheduled = _call(pipe)
    torch.testing.assert_close(scheduled, plain, rtol=0, atol=0)


def test_schedules_scale_per_block_strengths(pipe_and_file):
    pipe, f = pipe_and_file
    zl.apply_adapter(pipe, f, scale={"*": 1.0, "layers.0": 0.5}, name="style")
    seen = _spy(pipe)
    with zl.schedule(pipe, {"style": [(0.0, 1.0), (1.0, 0.0)]}):
        _call(pipe)
    m = "layers.0.attention.to_q"
    got = [v for s in seen for v in (s.default, s.at(m))]
    assert got == pytest.approx([v for i in range(4) for v in (1 - i / 4, 0.5 * (1 - i / 4))])
    assert attached(pipe.transformer, "style").strength.get().at(m) == 0.5  # put back


def test_unknown_adapter_is_refused(pipe_and_file):
    pipe, _ = pipe_and_file
    with pytest.raises(zl.LoRAError, match="no adapter named 'nope'"):
        with zl.schedule(pipe, {"nope": POINTS}):
            pass
    assert type(pipe).__name__ == "ZImagePipeline"


class _Stack(torch.nn.Module):
    """Four blocks of one Linear each, named like the transformer's main stack."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _stack_lora() -> zl.Adapter:
    g = torch.Generator().manual_seed(1)
    return zl.Adapter(name="a", format="test", source="test", targets=[
        zl.Target(f"layers.{i}", "lora", {"down": torch.randn(2, 16, generator=g) / 4,
                                          "up": torch.randn(16, 2, generator=g) / 4}) for i in range(4)])


def test_compiled_model_does_not_recompile_when_per_block_strengths_change():
    # A plain stack, not the tiny transformer: compiling the latter hits a recursion in the forward gate
    # (apply.gate) that is not about strengths.
    torch.compiler.reset()
    model, reference = _Stack(), _Stack()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    zl.apply_adapter(model, _stack_lora(), scale={"*": 1.0, "layers.0": 0.5, "layers.2-3": 0.2}, name="a")
    zl.apply_adapter(reference, _stack_lora(), name="a")
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(3, 16)
    with torch.no_grad():
        compiled(x)
        n = len(graphs)
        for spec in ({"*": 0.3, "layers.0": -1.0, "layers.2-3": 2.0}, 0.7, {"*": 1.5, "layers.0": 0.1}):
            zl.set_adapter_scale(model, "a", spec)
            zl.set_adapter_scale(reference, "a", spec)
            torch.testing.assert_close(compiled(x), reference(x))
    assert len(graphs) == n, "a per-block strength change recompiled the model"
    torch.compiler.reset()


def test_generate_schedule(pipe_and_file, tmp_path):
    import numpy as np
    from PIL import Image

    from zimage_lora.tools.generate import generate

    pipe, f = pipe_and_file
    args = dict(steps=2, width=32, height=32, dtype="fp32", device="cpu", seed=3, pipeline=pipe)
    base = generate("a red cat", [], out=tmp_path / "base.png", **args)
    off = generate("a red cat", [f"{f}:4"], out=tmp_path / "off.png", schedule="0:0", **args)
    late = generate("a red cat", [f"{f}:4"], out=tmp_path / "late.png", schedule="0:0,0.5:1", **args)
    a, b, c = (np.asarray(Image.open(r.out)).astype(np.int16) for r in (base, off, late))
    assert np.array_equal(a, b)  # factor 0 at every step: exactly the base
    assert np.abs(a - c).mean() > 0.5


def test_per_sample_schedules(pipe_and_file):
    pipe, f = pipe_and_file
    zl.apply_adapter(pipe, f, scale=1.0, name="style")
    prompts = ["a red cat", "a blue dog"]

    def call(idx, **kw):
        g = [torch.Generator().manual_seed(3 + i) for i in idx]
        return pipe([prompts[i] for i in idx], height=32, width=32, num_inference_steps=4, guidance_scale=0.0,
                    generator=g, output_type="latent", **kw).images

    ramp = [(0.0, 1.0), (0.5, 0.0)]
    with zl.schedule(pipe, [{"style": ramp}, {}], specs=[{"style": 0.8}, {"style": 0.6}], interpolation="step"):
        both = call([0, 1])
    zl.set_adapter_scale(pipe.transformer, "style", 0.8)
    with zl.schedule(pipe, {"style": ramp}, interpolation="step"):
        first = call([0])
    zl.set_adapter_scale(pipe.transformer, "style", 0.6)
    second = call([1])
    torch.testing.assert_close(both[0], first[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1], second[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(zl.LoRAError, match="its spec does not"):
        with zl.schedule(pipe, [{"style": ramp}], specs=[{}]):
            pass
