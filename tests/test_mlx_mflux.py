"""The MLX backend on mflux's own Z-Image transformer, checked against the real things: a tiny mflux
`ZImageTransformer` whose weights come from a tiny diffusers model through mflux's own weight mapping
gives the diffusers model's result with the same adapter, in both modes; and on the layouts mflux's
own `LoRALoader` reads, our dynamic result equals mflux's."""

from __future__ import annotations

import contextlib
import io

import pytest

pytest.importorskip("mlx.core", reason="the [mlx] extra is not installed")
pytest.importorskip("mflux.models.z_image", reason="mflux is not installed (pip install --no-deps mflux==0.24.0)")

import _mlx  # noqa: E402

import zimage_lora as zl  # noqa: E402
from zimage_lora.examples import make_adapter, run_model, tiny_model  # noqa: E402


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "lycoris-lokr", "lycoris-loha", "lycoris-dora",
                                    "lycoris-full", "comfy-fused"])
@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_matches_diffusers(tmp_path, layout, mode):
    model = tiny_model(0)
    twin = _mlx.mflux_twin(model)
    inp = _mlx.inputs(3)
    path = make_adapter(layout, tmp_path / "a.safetensors", model)
    base_t, base_m = run_model(model, inp), _mlx.run_twin(twin, inp)
    zl.apply_adapter(model, path, scale=0.8, mode=mode)
    zl.apply_adapter(twin, path, scale=0.8, mode=mode)
    effect = run_model(model, inp) - base_t
    assert effect.norm() > 1e-2 * base_t.norm()
    got = _mlx.run_twin(twin, inp) - base_m
    assert float((got - effect).norm() / effect.norm()) < 1e-4
    zl.remove_adapter(twin)
    assert float((_mlx.run_twin(twin, inp) - base_m).abs().max()) == 0.0


@pytest.mark.parametrize("layout", ["diffusers", "ai-toolkit", "musubi-other"])
def test_equals_mflux_lora_loader(tmp_path, layout):
    from mflux.models.common.lora.mapping.lora_loader import LoRALoader
    from mflux.models.z_image.weights.z_image_lora_mapping import ZImageLoRAMapping

    model = tiny_model(0)
    path = make_adapter(layout, tmp_path / "a.safetensors", model)
    theirs, ours = _mlx.mflux_twin(model), _mlx.mflux_twin(model)
    with contextlib.redirect_stdout(io.StringIO()):  # mflux prints progress
        LoRALoader.load_and_apply_lora(ZImageLoRAMapping.get_mapping(), theirs, [str(path)], [0.8], bake_lora=False)
    zl.apply_adapter(ours, path, scale=0.8)
    inp = _mlx.inputs(3)
    base = _mlx.run_twin(_mlx.mflux_twin(model), inp)
    want, got = _mlx.run_twin(theirs, inp), _mlx.run_twin(ours, inp)
    assert float((got - want).norm() / (want - base).norm()) < 1e-5


def test_load_adapter_resolves_against_mflux_tree(tmp_path):
    """mflux spells a few layers its own way (`t_embedder.linear1`, the final `adaLN_modulation.0`): an
    adapter loaded against its tree lands on the layers diffusers' names give, as with the torch model."""
    model = tiny_model(0)
    twin = _mlx.mflux_twin(model)
    path = make_adapter("kohya", tmp_path / "a.safetensors", model)
    pipe = _mlx._Node()  # as mflux's `ZImage`, which holds the transformer
    pipe.transformer = twin
    ours, theirs = zl.load_adapter(path, pipe), zl.load_adapter(path, model)
    modules = sorted((t.module, t.rows, t.scale) for t in ours.targets)
    assert modules == sorted((t.module, t.rows, t.scale) for t in theirs.targets)
    assert {"t_embedder.mlp.0", "all_final_layer.2-1.adaLN_modulation.1"} <= {m for m, *_ in modules}
    assert zl.apply_adapter(twin, ours).applied == [t.label for t in theirs.targets]


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_per_block_strengths_on_mflux_tree(tmp_path, mode):
    """Patterns name diffusers' layers; on mflux's tree (its own spellings of the timestep MLP and the
    final adaLN) they land where they land on the diffusers model."""
    model = tiny_model(0)
    twin = _mlx.mflux_twin(model)
    inp = _mlx.inputs(4)
    path = make_adapter("kohya", tmp_path / "a.safetensors", model)
    base_t, base_m = run_model(model, inp), _mlx.run_twin(twin, inp)
    blocks = {"*": 0.8, "t_embedder": -1.5, "final_layer": 2.0, "layers.1": 0.0, "attention": 0.4}
    for m in (model, twin):
        zl.apply_adapter(m, path, scale=blocks, mode=mode)
    effect = run_model(model, inp) - base_t
    got = _mlx.run_twin(twin, inp) - base_m
    assert float((got - effect).norm() / effect.norm()) < 1e-4


def test_schedule_runs_through_mflux_callbacks(tmp_path):
    """`zl.schedule` on mflux's model: its callback registry (what `ZImage.generate_image` calls before
    the loop and after each step) sets each step's strength; leaving the block restores it."""
    from types import SimpleNamespace

    import mlx.core as mx
    from mflux.callbacks.callback_registry import CallbackRegistry

    model = tiny_model(0)
    pipe = _mlx._Node()  # as mflux's `ZImage`: the transformer and the callback registry
    pipe.transformer, pipe.callbacks = _mlx.mflux_twin(model), CallbackRegistry()
    zl.apply_adapter(pipe, make_adapter("diffusers", tmp_path / "a.safetensors", model), name="a", scale=0.8)
    config = SimpleNamespace(num_inference_steps=4, init_time_step=0, time_steps=range(4))
    seen = []
    latents = mx.zeros((1,))
    with zl.schedule(pipe, {"a": [(0.0, 1.0), (1.0, 0.0)]}):
        ctx = pipe.callbacks.start(seed=1, prompt="a fox", config=config)  # the loop of generate_image
        ctx.before_loop(latents)
        for t in config.time_steps:
            seen.append(zl.list_adapters(pipe)[0].scale)
            ctx.in_loop(t, latents)
        ctx.after_loop(latents)
    assert seen == pytest.approx([0.8, 0.6, 0.4, 0.2])  # step t at fraction t / 4
    assert zl.list_adapters(pipe)[0].scale == 0.8
    assert not pipe.callbacks.in_loop and not pipe.callbacks.before_loop
    bare = _mlx._Node()
    bare.transformer = pipe.transformer
    with pytest.raises(zl.UnsupportedError, match="callbacks"), zl.schedule(bare, {"a": [(0.0, 1.0)]}):
        pass
