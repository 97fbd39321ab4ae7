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
