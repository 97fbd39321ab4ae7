"""The MLX backend's dynamic overhead and switching time, beside mflux's own LoRA layers.

1. One layer at each Z-Image-Turbo width (attention 3840x3840; feed-forward w1/w3 3840 -> 10240 and w2
   10240 -> 3840), as `nn.Linear` and as a 4-bit `nn.QuantizedLinear` (group 64, affine: mflux's `-q 4`),
   rank-32 LoRA: the base layer alone, ours (`apply_adapter(..., mode="dynamic")`), mflux's `LoRALinear`
   on the same base; then two LoRAs: ours (one concatenated product) vs mflux's `FusedLoRALinear`.
   Interleaved rounds; medians of each case's time and median per-round ratios.
2. Switching on a model with Turbo's 276 Linear names (tiny widths), two dynamic LoRAs attached:
   `set_adapter_scale` and `set_active_adapters` per call.

    PYTHONPATH=src python bench/mlx_dynamic.py [--tokens 256] [--rounds 7] [--dtype bf16] [--only w2]
    PYTHONPATH=src python bench/mlx_dynamic.py --quick     # checks it runs: fp32, 4 tokens, 1 round
"""

from __future__ import annotations

import argparse
import os
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

# label -> (layer name, out features, in features)
SHAPES = {"attention 3840 -> 3840": ("layers.0.attention.to_q", 3840, 3840),
          "feed-forward w1 3840 -> 10240": ("layers.0.feed_forward.w1", 10240, 3840),
          "feed-forward w2 10240 -> 3840": ("layers.0.feed_forward.w2", 3840, 10240)}
CASES = ("base", "ours", "mflux", "ours x2", "mflux x2")
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
                rows.append([label, kind, *(median(t[c]) * 1e3 for c in CASES),
                             *(median_ratio(t[c], b) - 1 for c in CASES[1:]),
                             median_ratio(t["ours"], t["mflux"]), median_ratio(t["ours x2"], t["mflux x2"])])
                print(rows[-1], flush=True)
    return rows


def switching(repeats: int = 210) -> dict[str, float]:
    model = tiny_model(0, n_layers=30, n_refiner_layers=2)
    twin = _mlx.mirror(model)
    out = {"layers": float(len(linear_names(model)))}
    assert out["layers"] == 276, out  # Z-Image-Turbo's count
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


HEADER = ["layer", "base", *(f"{c} ms" for c in CASES), "ours +", "mflux LoRALinear +", "ours, 2 LoRAs +",
          "mflux Fused, 2 LoRAs +", "ours / mflux", "ours / mflux, 2 LoRAs"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--only", default="", help="shapes whose label contains this (e.g. attention, w2)")
    ap.add_argument("--quick", action="store_true", help="a check that it runs: fp32, 4 tokens, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.rounds, args.dtype = 4, 1, "fp32"
    dtype = {"bf16": mx.bfloat16, "fp32": mx.float32}[args.dtype]
    mx.set_default_device(mx.cpu)
    rows = layer_overhead(args.tokens, args.rounds, dtype, args.only)
    table = md_table(HEADER, [[*r[:7], *(f"{v:+.1%}" for v in r[7:11]), *(f"{v:.2f}" for v in r[11:])]
                              for r in rows])
    sw = switching(21 if args.quick else 210)
    table += "\n\n" + md_table([f"switching, {sw['layers']:.0f} layers, 2 dynamic LoRAs", "ms per call"],
                               [[k, v] for k, v in sw.items() if k != "layers"])
    table = (f"MLX {mx.__version__} CPU ({os.cpu_count()} cores), {args.dtype}, {args.tokens} tokens, rank {RANK}, "
             f"{args.rounds} rounds, load average {os.getloadavg()[0]:.1f} at the end\n\n" + table)
    print(table)
    save(f"mlx-cpu-{args.dtype}" + ("-quick" if args.quick else ""),
         {"tokens": args.tokens, "rank": RANK, "rounds": args.rounds, "rows": rows, "switching": sw,
          "load": os.getloadavg()}, table)


if __name__ == "__main__":
    main()
