"""The MLX backend on an MLX model with Z-Image's names (`_mlx.mirror`), layer by layer against the
PyTorch engine on the diffusers model it mirrors: every example layout, both modes, switching,
re-weighting, exact restore. Runs wherever mlx is installed (no mflux needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="the [mlx] extra is not installed")

import _mlx  # noqa: E402

import zimage_lora as zl  # noqa: E402
from zimage_lora.examples import EXAMPLES, make_adapter, tiny_model  # noqa: E402
from zimage_lora.mlx.tree import Tree, get_path  # noqa: E402

LAYOUTS = [k for k in EXAMPLES if not k.startswith("peft")]


def arrays(model) -> dict[str, bytes]:
    from mlx.utils import tree_flatten

    return {k: np.array(v).tobytes() for k, v in tree_flatten(model.parameters())}


def layer_gap(torch_model, mlx_model, base_torch) -> float:
    """Worst |MLX layer - torch layer| over every Linear, relative to the adapter's effect there."""
    worst = 0.0
    tree = Tree(mlx_model)
    g = torch.Generator().manual_seed(5)
    for name in tree.path:
        theirs = torch_model.get_submodule(name)
        if not hasattr(theirs, "in_features") and not hasattr(theirs, "base_layer"):
            continue
        ours = tree.get(name)
        base = base_torch.get_submodule(name)
        x = torch.randn(3, base.in_features, generator=g)
        with torch.no_grad():
            want, plain = theirs(x), base(x)
        got = torch.from_numpy(_mlx.to_np(ours(_mlx.to_mx(x))))
        effect = float((want - plain).norm())
        if effect > 0:
            worst = max(worst, float((got - want).norm()) / effect)
    return worst


@pytest.fixture(scope="module")
def tiny_pair():
    return tiny_model(0), tiny_model(0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_every_layout_matches_torch(tiny_pair, tmp_path, layout, mode):
    model, base = tiny_pair
    path = make_adapter(layout, tmp_path / f"{layout}.safetensors", model)
    twin = _mlx.mirror(model)
    before = arrays(twin)
    report = zl.apply_adapter(twin, path, scale=0.7, mode=mode, name="a")
    theirs = zl.apply_adapter(model, path, scale=0.7, mode=mode, name="a")
    try:
        assert report.applied == theirs.applied and report.unmatched == theirs.unmatched
        assert layer_gap(model, twin, base) < 1e-4
    finally:
        zl.remove_adapter(model)
    assert zl.remove_adapter(twin) == ["a"]
    assert arrays(twin) == before
    assert not any(type(m).__name__.startswith("Adapter") for _n, m in twin.named_modules())


def test_switching_and_reweighting(tmp_path):
    model, base = tiny_model(0), tiny_model(0)
    twin = _mlx.mirror(model)
    a = make_adapter("diffusers", tmp_path / "a.safetensors", model, seed=1)
    b = make_adapter("kohya", tmp_path / "b.safetensors", model, seed=2)
    c = make_adapter("lycoris-lokr-factorized", tmp_path / "c.safetensors", model, seed=3)
    for m in (model, twin):
        zl.apply_adapter(m, a, name="a", scale=0.5)
        zl.apply_adapter(m, b, name="b", scale=0.9)
        zl.apply_adapter(m, c, name="c", mode="merged", scale=0.3)
    assert layer_gap(model, twin, base) < 1e-4  # two LoRAs as one concatenated product, plus a merge
    layer = Tree(twin).get("layers.0.attention.to_q")
    for m in (model, twin):
        zl.set_adapter_scale(m, "a", -1.5)
        zl.set_active_adapters(m, ["a", "c"])
    assert layer_gap(model, twin, base) < 1e-4
    assert Tree(twin).get("layers.0.attention.to_q") is layer  # switching kept the wrapper object
    handle = zl.Adapters(twin)
    handle.fuse("a")
    zl.Adapters(model).fuse("a")
    assert layer_gap(model, twin, base) < 1e-4
    assert [(i.name, i.mode, i.active) for i in handle.list()] == [
        (i.name, i.mode, i.active) for i in zl.list_adapters(model)]
    handle.unload()
    assert arrays(twin) == arrays(_mlx.mirror(tiny_model(0)))


def test_failed_apply_changes_nothing(tmp_path):
    model = tiny_model(0)
    twin = _mlx.mirror(model)
    twin.apply(lambda a: a.astype(mx.float16))
    zl.apply_adapter(twin, make_adapter("diffusers", tmp_path / "a.safetensors", model), name="a")
    before = arrays(twin)
    big = make_adapter("lycoris-full", tmp_path / "f.safetensors", model)
    with pytest.raises(zl.LoRAError, match="overflows the weight's dtype"):
        zl.apply_adapter(twin, big, name="a", mode="merged", scale=1e7)  # past float16's range when merged
    assert arrays(twin) == before and [i.name for i in zl.list_adapters(twin)] == ["a"]
    with pytest.raises(zl.LoRAError, match="no adapter named 'x'"):
        zl.remove_adapter(twin, "x")


def test_lokr_dynamic_keeps_factors(tmp_path):
    model = tiny_model(0)
    twin = _mlx.mirror(model)
    zl.apply_adapter(twin, make_adapter("lycoris-lokr", tmp_path / "k.safetensors", model), name="k")
    layer = Tree(twin).get("layers.0.feed_forward.w1")
    (slot,) = layer._zl_slots
    assert slot.kind == "lokr" and set(slot.t) == {"w1", "w2"}
    out_f, in_f = layer.weight.shape
    assert sum(math.prod(v.shape) for v in slot.t.values()) < out_f * in_f / 10
    assert get_path(twin, "layers.0.feed_forward.w1") is layer


def test_pipeline_object_means_its_transformer(tmp_path):
    """mflux's `ZImage` holds text encoder, VAE and transformer: the API works on its transformer."""
    model = tiny_model(0)

    class Pipe(_mlx._Node):
        pass

    pipe = Pipe()
    pipe.transformer = _mlx.mirror(model)
    report = zl.apply_adapter(pipe, make_adapter("diffusers", tmp_path / "a.safetensors", model), name="a")
    assert report.applied and [i.name for i in zl.Adapters(pipe).list()] == ["a"]
    assert zl.list_adapters(pipe.transformer) == zl.list_adapters(pipe)
    assert zl.remove_adapter(pipe) == ["a"]


def test_merged_adapter_off_and_on(tmp_path):
    model, base = tiny_model(0), tiny_model(0)
    twin = _mlx.mirror(model)
    before = arrays(twin)
    path = make_adapter("lycoris-loha", tmp_path / "h.safetensors", model)
    for m in (model, twin):
        zl.apply_adapter(m, path, name="h", mode="merged", scale=0.6)
        zl.set_active_adapters(m, [])
    assert arrays(twin) == before
    for m in (model, twin):
        zl.set_active_adapters(m, ["h"], [0.9])
    assert layer_gap(model, twin, base) < 1e-4
