"""The public API's edges on MLX models: `load_adapter` against an MLX tree, hot swap, per-block
strengths, the dynamic overflow rule on re-weight, and a clear `UnsupportedError` for every public
function the MLX backend does not carry out. References: the PyTorch engine on the diffusers model the
MLX model mirrors (`_mlx.mirror`)."""

from __future__ import annotations

import pytest

mx = pytest.importorskip("mlx.core", reason="the [mlx] extra is not installed")

import _mlx  # noqa: E402
from test_mlx_engine import arrays, layer_gap  # noqa: E402

import zimage_lora as zl  # noqa: E402
from zimage_lora.examples import make_adapter, tiny_model  # noqa: E402
from zimage_lora.mlx.tree import get_path  # noqa: E402


def _key(adapter: zl.Adapter) -> list[tuple]:
    return [(t.module, t.algorithm, t.rows, t.delta_rows, t.scale, sorted(t.tensors)) for t in adapter.targets]


@pytest.mark.parametrize("layout", ["kohya-fused", "comfy-fused", "lycoris-lokr"])
def test_load_adapter_resolves_against_the_mlx_tree(tmp_path, layout):
    model, base = tiny_model(0), tiny_model(0)
    twin = _mlx.mirror(model)
    path = make_adapter(layout, tmp_path / "a.safetensors", model)
    ours, theirs = zl.load_adapter(path, twin), zl.load_adapter(path, model)
    assert ours.targets and _key(ours) == _key(theirs)
    assert ours.unmatched == theirs.unmatched
    report = zl.apply_adapter(twin, ours, name="a", scale=0.6)
    zl.apply_adapter(model, theirs, name="a", scale=0.6)
    assert report.applied == [t.label for t in theirs.targets]
    assert layer_gap(model, twin, base) < 1e-4


def test_arithmetic_resolves_against_the_mlx_tree(tmp_path):
    model = tiny_model(0)
    twin = _mlx.mirror(model)
    path = make_adapter("diffusers", tmp_path / "a.safetensors", model, rank=8)
    ours, theirs = zl.resize(path, rank=4, model=twin), zl.resize(path, rank=4, model=model)
    assert sorted(_key(ours)) == sorted(_key(theirs)) and ours.targets
    before = arrays(twin)
    zl.apply_adapter(twin, ours, name="r")
    zl.remove_adapter(twin)
    assert arrays(twin) == before


def _pipe(twin):
    """An object holding the MLX transformer as `transformer`, as mflux's `ZImage` does."""
    pipe = _mlx._Node()
    pipe.transformer = twin
    return pipe


# (what the error names, a call of it on the MLX model); context managers refuse on entering the block.
REFUSED = {
    "per_sample_adapters": ("per_sample_adapters", lambda m: zl.per_sample_adapters(m, [{"a": 1.0}]).__enter__()),
    "Adapters.per_sample": ("per_sample_adapters", lambda m: zl.Adapters(m).per_sample([{"a": 1.0}]).__enter__()),
    "per-sample schedule": ("per_sample_adapters", lambda m: zl.schedule(
        _pipe(m), [{"a": [(0.0, 1.0), (1.0, 0.0)]}], specs=[{"a": 1.0}]).__enter__()),
    "regional_adapters": ("regional_adapters",
                          lambda m: zl.regional_adapters(_pipe(m), {"a": (0.0, 0.0, 0.5, 1.0)}).__enter__()),
    "AdapterStore": ("AdapterStore", lambda m: zl.AdapterStore(m)),
    "generate_batch": ("generate_batch",
                       lambda m: zl.generate_batch(_pipe(m), [zl.Request("a fox", adapters={"a": 1.0})])),
}


@pytest.mark.parametrize("call", list(REFUSED))
def test_unsupported_features_say_so(tmp_path, call):
    model = tiny_model(0)
    twin = _mlx.mirror(model)
    zl.apply_adapter(twin, make_adapter("diffusers", tmp_path / "a.safetensors", model), name="a")
    before = arrays(twin)
    feature, run = REFUSED[call]
    with pytest.raises(zl.UnsupportedError, match=rf"^{feature} is not supported on MLX models: \w"):
        run(twin)
    assert arrays(twin) == before
    assert [(i.name, i.active, i.scale) for i in zl.list_adapters(twin)] == [("a", True, 1.0)]


def test_unfuse_runs_dynamic_again(tmp_path):
    model, base = tiny_model(0), tiny_model(0)
    twin = _mlx.mirror(model)
    path = make_adapter("lycoris-lokr-factorized", tmp_path / "k.safetensors", model)
    for m in (model, twin):
        zl.apply_adapter(m, path, name="k", mode="merged", scale=0.7)
        zl.Adapters(m).unfuse("k")
    assert [(i.mode, i.scale) for i in zl.list_adapters(twin)] == [("dynamic", 0.7)]
    assert type(get_path(twin, "layers.0.feed_forward.w1")).__name__ == "AdapterLinear"
    assert arrays(twin) == arrays(_mlx.mirror(tiny_model(0)))  # the weights are the originals again
    assert layer_gap(model, twin, base) < 1e-4


def test_hot_swap_into_existing_slots(tmp_path):
    """A same-shaped adapter under an attached name goes into the existing slots (the PyTorch engine
    does the same), also where its LoRA runs stacked with another one in one product; another layout
    is attached afresh."""
    model, base = tiny_model(0), tiny_model(0)
    twin = _mlx.mirror(model)
    a, b, other = (make_adapter("diffusers", tmp_path / f"{k}.safetensors", model, seed=i) for i, k in enumerate("abo"))
    lokr = make_adapter("lycoris-lokr", tmp_path / "k.safetensors", model)
    for m in (model, twin):
        zl.apply_adapter(m, a, name="s", scale=0.5)
        zl.apply_adapter(m, other, name="o", scale=0.4)
    layer = get_path(twin, "layers.0.attention.to_q")
    slots = list(layer._zl_slots)
    layer(mx.zeros((1, 64)))  # the stacked product of both LoRAs is cached now
    reports = [zl.apply_adapter(m, b, name="s", scale=0.5) for m in (model, twin)]  # same strength: same cache key
    assert reports[1].hotswapped and reports[1].replaced and reports[0].hotswapped
    assert get_path(twin, "layers.0.attention.to_q") is layer and list(layer._zl_slots) == slots
    assert layer_gap(model, twin, base) < 1e-4
    assert [(i.name, i.scale, i.source) for i in zl.list_adapters(twin)] == [("s", 0.5, str(b)), ("o", 0.4, str(other))]
    reports = [zl.apply_adapter(m, lokr, name="s") for m in (model, twin)]
    assert reports[1].replaced and not reports[1].hotswapped
    assert layer_gap(model, twin, base) < 1e-4


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_per_block_strengths(tmp_path, mode):
    """A {pattern: number} strength lands on the same layers at the same numbers as on the PyTorch
    engine: at apply, on re-weight, and as a weight of set_active_adapters."""
    model, base = tiny_model(0), tiny_model(0)
    twin = _mlx.mirror(model)
    path = make_adapter("kohya", tmp_path / "a.safetensors", model)
    first = {"*": 0.8, "layers.0": 0.3, "feed_forward": -0.5, "layers.1.attention.to_q": 0.0}
    for m in (model, twin):
        zl.apply_adapter(m, path, name="a", mode=mode, scale=first)
    assert layer_gap(model, twin, base) < 1e-4
    for m in (model, twin):
        zl.set_adapter_scale(m, "a", {"late": 1.5, "noise_refiner": -1.0})
    assert layer_gap(model, twin, base) < 1e-4
    for m in (model, twin):
        zl.set_active_adapters(m, ["a"], [{"attention": 0.25, "text_encoder": 9.0}])  # no text encoder here
    assert layer_gap(model, twin, base) < 1e-4
    for m in (model, twin):
        zl.set_adapter_scale(m, "a", 0.6)  # a plain number again: every module
    assert layer_gap(model, twin, base) < 1e-4
    before = arrays(twin)
    with pytest.raises(zl.InvalidArgumentError, match="pattern 'layers.9' matches no module of the model"):
        zl.set_adapter_scale(twin, "a", {"layers.9": 1.0})
    assert arrays(twin) == before and zl.list_adapters(twin)[0].scale == 0.6


@pytest.mark.parametrize(("dtype", "huge"), [("float16", 1e37), ("bfloat16", 1e38)])
def test_dynamic_reweight_refuses_overflow(tmp_path, dtype, huge):
    """The PyTorch engine's rule: a strength whose delta overflows the compute dtype is refused, at apply
    and on every re-weight, and nothing changes; a large strength that fits is accepted."""
    torch = pytest.importorskip("torch")
    model = tiny_model(0)
    path = make_adapter("diffusers", tmp_path / "a.safetensors", model, alpha=400.0)  # deltas of order 10
    twin = _mlx.mirror(model)
    twin.apply(lambda a: a.astype(getattr(mx, dtype)))
    reference = tiny_model(0, dtype=getattr(torch, dtype))
    for m in (reference, twin):
        zl.apply_adapter(m, path, name="a", scale=0.5)
    x = mx.ones((2, 64), dtype=getattr(mx, dtype))
    layer = get_path(twin, "layers.0.attention.to_q")
    out = _mlx.to_np(layer(x))
    calls = [lambda m: zl.set_adapter_scale(m, "a", huge),
             lambda m: zl.set_adapter_scale(m, "a", {"layers.0": huge}),
             lambda m: zl.set_active_adapters(m, ["a"], [huge]),
             lambda m: zl.apply_adapter(m, path, name="b", scale=huge)]
    for call in calls:
        for m in (reference, twin):  # the same refusal on both engines
            with pytest.raises(zl.LoRAError, match="overflows the compute dtype"):
                call(m)
        assert [(i.name, i.scale) for i in zl.list_adapters(twin)] == [("a", 0.5)]
        assert (_mlx.to_np(get_path(twin, "layers.0.attention.to_q")(x)) == out).all()
    zl.set_adapter_scale(twin, "a", 100.0)  # fits: accepted by both
    zl.set_adapter_scale(reference, "a", 100.0)
    assert zl.list_adapters(twin)[0].scale == 100.0


def test_reweight_after_hot_swap_checks_the_new_tensors(tmp_path):
    """The headroom kept for re-weighting is the swapped-in adapter's, not the one it replaced."""
    torch = pytest.importorskip("torch")
    model = tiny_model(0)
    small = make_adapter("diffusers", tmp_path / "s.safetensors", model, alpha=0.01)
    large = make_adapter("diffusers", tmp_path / "l.safetensors", model, alpha=400.0)  # same shapes
    twin = _mlx.mirror(model)
    twin.apply(lambda a: a.astype(mx.float16))
    reference = tiny_model(0, dtype=torch.float16)
    for m in (reference, twin):
        zl.apply_adapter(m, small, name="a", scale=0.5)
        zl.set_adapter_scale(m, "a", 1e4)  # fits for the small one
        assert zl.apply_adapter(m, large, name="a", scale=0.5).hotswapped
        with pytest.raises(zl.LoRAError, match="overflows the compute dtype"):
            zl.set_adapter_scale(m, "a", 1e4)
    assert [(i.name, i.scale) for i in zl.list_adapters(twin)] == [("a", 0.5)]
