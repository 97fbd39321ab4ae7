"""The MLX backend's dynamic overhead and switching time, beside mflux's own LoRA layers.

1. One layer at Z-Image-Turbo widths (attention 3840x3840, feed-forward w1 10240x3840), as `nn.Linear`
   and as a 4-bit `nn.QuantizedLinear` (group 64, affine: mflux's `-q 4`), rank-32 LoRA: the base layer
   alone, ours (`apply_adapter(..., mode="dynamic")`), mflux's `LoRALinear`; then two LoRAs: ours (one
   concatenated product) vs mflux's `FusedLoRALinear`. Median per-round ratios over interleaved rounds.
2. Switching on a model with Turbo's 276 Linear names (tiny widths), two dynamic LoRAs attached:
   `set_adapter_scale` and `set_active_adapters` per call.

    PYTHONPATH=src python bench/mlx_dynamic.py [--tokens 256] [--rounds 7] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
from _common import interleaved, md_table, median, median_ratio, save
from mlx import nn

import zimage_lora as zl
from zimage_lora.examples import linear_names, make_adapter, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _mlx  # noqa: E402 - the tests' MLX mirror of a diffusers model

from zimage_lora.mlx.tree import get_path

SHAPES = {"attention 3840x3840": ("layers.0.attention.to_q", 3840, 3840),
          "feed-forward w1 10240x3840": ("layers.0.feed_forward.w1", 10240, 3840)}
RANK = 32


def _holder(path: str, layer: nn.Module) -> nn.Module:
    """A model with `layer` at `path` (Z-Image names), so the public API resolves keys onto it."""
    root = _mlx._Node()
    _mlx._put(root, path.split("."), layer)
    return root


def _adapter(tmp: Path, name: str, path: str, out_f: int, in_f: int, seed: int) -> Path:
    """A rank-32 LoRA for one layer, through the library's own reader (file written by `write`)."""
    import torch

    from zimage_lora.layouts import Item, write

    g = torch.Generator().manual_seed(seed)
    item = Item(path, "lora", {"down": torch.randn(RANK, in_f, generator=g) / in_f ** 0.5,
                               "up": torch.randn(out_f, RANK, generator=g) * 0.01}, 1.0, RANK, None)
    return write.save([item], "diffusers", tmp / f"{name}.safetensors")


def _mflux_lora(base: nn.Module, dtype: mx.Dtype, seed: int):
    from mflux.models.common.lora.layer.linear_lora_layer import LoRALinear

    mx.random.seed(seed)
    lora = LoRALinear.from_linear(base, r=RANK)
    lora.lora_B = (mx.random.normal(lora.lora_B.shape) * 0.01).astype(dtype)
    lora.lora_A = lora.lora_A.astype(dtype)
    return lora


def layer_overhead(tokens: int, rounds: int, dtype: mx.Dtype, only: str = "") -> list[list[object]]:
    from mflux.models.common.lora.layer.fused_linear_lora_layer import FusedLoRALinear

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (path, out_f, in_f) in SHAPES.items():
            if only not in label:
                continue
            files = [_adapter(Path(tmp), k, path, out_f, in_f, i) for i, k in enumerate("ab")]
            for kind in ("Linear", "QuantizedLinear 4-bit g64"):
                lin = nn.Linear(in_f, out_f, bias=False)
                lin.set_dtype(dtype)
                base = nn.QuantizedLinear.from_linear(lin, 64, 4) if kind != "Linear" else lin
                x = mx.random.normal((tokens, in_f)).astype(dtype)
                ours = _holder(path, base)
                zl.apply_adapter(ours, files[0], name="a")
                wrapped = get_path(ours, path)
                theirs = _mflux_lora(base, dtype, 0)
                zl.apply_adapter(ours2 := _holder(path, base), files[0], name="a")
                zl.apply_adapter(ours2, files[1], name="b")
                wrapped2 = get_path(ours2, path)
                theirs2 = FusedLoRALinear(base, [_mflux_lora(base, dtype, 0), _mflux_lora(base, dtype, 1)])
                cases = {n: (lambda f=f, x=x: mx.eval(f(x))) for n, f in
                         {"base": base, "ours": wrapped, "mflux": theirs, "ours x2": wrapped2,
                          "mflux x2": theirs2}.items()}
                t = interleaved(cases, "cpu", rounds, inner=1)
                b = t["base"]
                rows.append([label, kind, median(b) * 1e3,
                             median_ratio(t["ours"], b) - 1, median_ratio(t["mflux"], b) - 1,
                             median_ratio(t["ours x2"], b) - 1, median_ratio(t["mflux x2"], b) - 1])
                print(rows[-1], flush=True)
    return rows


def switching(repeats: int = 200) -> dict[str, float]:
    model = tiny_model(0, n_layers=30, n_refiner_layers=2)
    twin = _mlx.mirror(model)
    out = {"layers": float(len(linear_names(model)))}
    with tempfile.TemporaryDirectory() as tmp:
        for i, k in enumerate("ab"):
            zl.apply_adapter(twin, make_adapter("diffusers", Path(tmp) / f"{k}.safetensors", model, seed=i), name=k)

    def per_call(fn) -> float:
        samples = []
        for _ in range(7):
            t0 = time.perf_counter()
            for i in range(repeats // 7):
                fn(i)
            samples.append((time.perf_counter() - t0) / (repeats // 7))
        return statistics.median(samples)

    out["set_adapter_scale ms"] = per_call(lambda i: zl.set_adapter_scale(twin, "a", 0.3 + (i & 1))) * 1e3
    out["set_active_adapters ms"] = per_call(lambda i: zl.set_active_adapters(twin, ["a"] if i & 1 else ["b"])) * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--only", default="", help="shapes whose label contains this (e.g. attention)")
    args = ap.parse_args()
    dtype = {"bf16": mx.bfloat16, "fp32": mx.float32}[args.dtype]
    mx.set_default_device(mx.cpu)
    rows = layer_overhead(args.tokens, args.rounds, dtype, args.only)
    table = md_table(["layer", "base", "base ms", "ours +", "mflux LoRALinear +", "ours, 2 LoRAs +",
                      "mflux Fused, 2 LoRAs +"], rows)
    sw = switching()
    table += "\n\n" + md_table(["switching, 276 layers, 2 dynamic LoRAs", "ms per call"],
                               [[k, v] for k, v in sw.items() if k != "layers"])
    print(table)
    save(f"mlx-cpu-{args.dtype}", {"tokens": args.tokens, "rank": RANK, "rows": rows, "switching": sw}, table)


if __name__ == "__main__":
    main()
