"""The MLX backend on `nn.QuantizedLinear` bases, every mode MLX 0.32 offers, against the dense
reference of `tests/_quant.py`: the quantized layers decoded by MLX's own `dequantize` into plain
float layers. Dynamic: equal to the dense model with the adapter, the base still quantized and its
arrays untouched. Merged: same bits, group size and mode; the reported loss recomputed independently;
removal restores the stored arrays bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core", reason="the [mlx] extra is not installed")

import _mlx  # noqa: E402
from mlx import nn  # noqa: E402
from test_mlx_engine import arrays  # noqa: E402

import zimage_lora as zl  # noqa: E402
from zimage_lora.examples import make_adapter, tiny_model  # noqa: E402
from zimage_lora.mlx.tree import Tree  # noqa: E402

FORMATS = [("affine", 32, 4), ("affine", 64, 4), ("affine", 128, 4), ("affine", 32, 8), ("affine", 64, 8),
           ("affine", 128, 8), ("mxfp4", 32, 4), ("mxfp8", 32, 8), ("nvfp4", 16, 4)]


def dense_of(model: nn.Module) -> nn.Module:
    """Each QuantizedLinear replaced by a Linear holding what MLX's `dequantize` decodes it to."""
    tree = Tree(model)
    for name in tree.path:
        q = tree.get(name)
        if isinstance(q, nn.QuantizedLinear):
            w = mx.dequantize(q.weight, q.scales, q.get("biases"), q.group_size, q.bits, mode=q.mode)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in q)
            lin.weight = w.astype(mx.float32)  # fp4/fp8 modes decode into bf16
            if "bias" in q:
                lin.bias = q.bias
            tree.set(name, lin)
    return model


def outputs(model: nn.Module, xs: dict[str, mx.array]) -> dict[str, np.ndarray]:
    tree = Tree(model)
    return {n: _mlx.to_np(tree.get(n)(x)) for n, x in xs.items()}


def gap(got: dict, want: dict, base: dict) -> float:
    return max(float(np.linalg.norm(got[n] - want[n]) / max(np.linalg.norm(want[n] - base[n]), 1e-30))
               for n in want)


# Each format with one algorithm (LoRA, LoKr without the Kronecker product, DoRA), in turn: small and fast.
CASES = [(f, ("diffusers", "lycoris-lokr-factorized", "lycoris-dora")[i % 3]) for i, f in enumerate(FORMATS)]


@pytest.mark.parametrize(("fmt", "layout"), CASES,
                         ids=lambda c: c if isinstance(c, str) else f"{c[0]}-g{c[1]}-{c[2]}bit")
@pytest.mark.filterwarnings("ignore:merging adapter")
def test_quantized(tmp_path, fmt, layout):
    mode_q, group, bits = fmt
    model = tiny_model(0)
    path = make_adapter(layout, tmp_path / "a.safetensors", model)
    quant = _mlx.quantize(_mlx.mirror(model), group, bits, mode_q)
    dense = dense_of(_mlx.quantize(_mlx.mirror(model), group, bits, mode_q))
    names = [n for n in Tree(quant).path if isinstance(Tree(quant).get(n), nn.QuantizedLinear)]
    assert names
    g = np.random.default_rng(0)
    xs = {n: mx.array(g.standard_normal((3, Tree(dense).get(n).weight.shape[1])).astype(np.float32)) for n in names}
    before, base = arrays(quant), outputs(quant, xs)

    zl.apply_adapter(dense, path, scale=0.8, name="a")
    want = outputs(dense, xs)
    zl.apply_adapter(quant, path, scale=0.8, name="a")
    assert gap(outputs(quant, xs), want, base) < 1e-4
    assert all(isinstance(Tree(quant).get(n), nn.QuantizedLinear) for n in names)
    assert arrays(quant) == before  # the base is untouched and still quantized
    zl.remove_adapter(quant)

    zl.remove_adapter(dense)
    w0 = {n: _mlx.to_np(Tree(dense).get(n).weight) for n in names}
    zl.apply_adapter(dense, path, scale=0.8, mode="merged", name="a")
    report = zl.apply_adapter(quant, path, scale=0.8, mode="merged", name="a")
    assert set(report.requant_loss) == set(names) & set(report.modules)
    for name, loss in report.requant_loss.items():
        q = Tree(quant).get(name)
        assert type(q) is nn.QuantizedLinear and (q.bits, q.group_size, q.mode) == (bits, group, mode_q)
        stored = _mlx.to_np(mx.dequantize(q.weight, q.scales, q.get("biases"), group, bits, mode=mode_q))
        target = _mlx.to_np(Tree(dense).get(name).weight)  # W + dW in fp32, by the dense model's merge
        mine = float(np.linalg.norm(stored - target) / np.linalg.norm(target - w0[name]))
        assert abs(mine - loss) <= 1e-3 * max(loss, 1e-3) + 1e-5, (name, mine, loss)
    if bits == 8 and mode_q == "affine":
        assert max(report.requant_loss.values()) < 0.5
    zl.remove_adapter(quant)
    assert arrays(quant) == before
    np.testing.assert_array_equal(outputs(quant, xs)[names[0]], base[names[0]])


@pytest.mark.filterwarnings("ignore:merging adapter")
def test_stored_scales_win_over_fresh(tmp_path):
    """A 4-bit merge keeps each group's stored grid where it fits: never worse than a fresh quantization."""
    model = tiny_model(0)
    path = make_adapter("diffusers", tmp_path / "a.safetensors", model)
    quant = _mlx.quantize(_mlx.mirror(model), 64, 4)
    dense = dense_of(_mlx.quantize(_mlx.mirror(model), 64, 4))
    name = "layers.0.feed_forward.w1"
    w0 = torch.from_numpy(_mlx.to_np(Tree(dense).get(name).weight))
    zl.apply_adapter(dense, path, scale=0.8, mode="merged", name="a")
    report = zl.apply_adapter(quant, path, scale=0.8, mode="merged", name="a")
    target = torch.from_numpy(_mlx.to_np(Tree(dense).get(name).weight))
    fresh = mx.quantize(_mlx.to_mx(target), 64, 4)
    fresh_w = torch.from_numpy(_mlx.to_np(mx.dequantize(*fresh, 64, 4)))
    fresh_loss = float((fresh_w - target).norm() / (target - w0).norm())
    assert report.requant_loss[name] < fresh_loss
