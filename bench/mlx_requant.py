"""Requantization loss of merges into MLX `QuantizedLinear` weights, every mode MLX 0.32 offers: "fresh"
(`mx.quantize` from scratch on W + dW) vs "merge" (the backend: stored grid per group where it decodes
closer). Same setting as bench/quant_requant_loss.py: a 256x256 layer, weights N(0, 1/256), a rank-16
delta scaled to a fraction of ||W||, median of 5 seeds.

    PYTHONPATH=src python bench/mlx_requant.py
"""

from __future__ import annotations

import statistics

import mlx.core as mx
import torch
from _common import md_table, save

from zimage_lora.mlx import quant
from zimage_lora.mlx.tree import to_torch

FORMATS = [("affine", 32, 4), ("affine", 64, 4), ("affine", 128, 4), ("affine", 64, 8), ("mxfp4", 32, 4),
           ("mxfp8", 32, 8), ("nvfp4", 16, 4)]
RATIOS = (0.02, 0.05, 0.2)


def losses(mode: str, group: int, bits: int, ratio: float, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 256, generator=g) / 16
    q = mx.quantize(mx.array(w.numpy()), group, bits, mode=mode)
    arrays = {"weight": q[0], "scales": q[1], **({"biases": q[2]} if len(q) > 2 else {})}
    spec = quant.Spec(group, bits, mode)
    w0 = to_torch(quant.decode(arrays, spec))
    dw = torch.randn(256, 16, generator=g) @ torch.randn(16, 256, generator=g)
    dw *= ratio * w0.norm() / dw.norm()
    target = w0 + dw
    fresh = mx.quantize(mx.array(target.numpy()), group, bits, mode=mode)
    fresh_w = to_torch(mx.dequantize(fresh[0], fresh[1], fresh[2] if len(fresh) > 2 else None, group, bits,
                                     mode=mode))
    _arrays, merged = quant.requantize(arrays, spec, target)
    return float((fresh_w - target).norm() / dw.norm()), float((merged - target).norm() / dw.norm())


def main() -> None:
    rows = []
    for mode, group, bits in FORMATS:
        row: list[object] = [f"{mode} {bits}-bit, group {group}"]
        for ratio in RATIOS:
            pairs = [losses(mode, group, bits, ratio, s) for s in range(5)]
            fresh = statistics.median(p[0] for p in pairs)
            merge = statistics.median(p[1] for p in pairs)
            row.append(f"{fresh:.1%} → {merge:.1%}")
        rows.append(row)
    table = md_table(["format"] + [f"‖dW‖/‖W‖ = {r}: fresh → merge" for r in RATIOS], rows)
    print(table)
    save("mlx-requant-loss", {"rows": rows}, table)


if __name__ == "__main__":
    main()
