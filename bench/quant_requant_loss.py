"""How much of a LoRA delta survives a merge into a quantized layer, per format.

For a 256x256 layer (weights N(0, 1/256)) and a rank-16 LoRA delta dW scaled to a given fraction of
||W||, each backend dequantizes the quantized layer (W0), requantizes W0 + dW in its own format, and we
report the lost fraction ||deq(Q(W0 + dW)) - W0 - dW|| / ||dW|| (median over seeds). 0 means lossless;
1 means the merge kept nothing of the adapter's direction on average. "fresh" is the same format's own
quantizer run from scratch on W0 + dW (new scales for every block: what a merge did before stored
scales were kept); "merge" is the backend's `set_base_weight`.

    python bench/quant_requant_loss.py [--ratios 0.02 0.05 0.2] [--seeds 5]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

SIZE, RANK = 256, 16


def torchao_layer(kind: str) -> Callable[[torch.Tensor], torch.nn.Module]:
    def make(w: torch.Tensor) -> torch.nn.Module:
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
            PerGroup,
            quantize_,
        )

        config = {
            "int8": Int8WeightOnlyConfig,
            "float8": Float8WeightOnlyConfig,
            "int4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
        }[kind]()
        lin = torch.nn.Linear(SIZE, SIZE, bias=False)
        lin.weight.data.copy_(w)
        quantize_(lin, config)
        return lin

    return make


def bnb4_layer(quant_type: str) -> Callable[[torch.Tensor], torch.nn.Module]:
    def make(w: torch.Tensor) -> torch.nn.Module:
        import bitsandbytes as bnb

        lin = bnb.nn.Linear4bit(SIZE, SIZE, bias=False, quant_type=quant_type, compute_dtype=torch.float32)
        lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type)
        return lin.to("cpu")

    return make


def bnb8_layer(w: torch.Tensor) -> torch.nn.Module:
    import bitsandbytes as bnb

    lin = bnb.nn.Linear8bitLt(SIZE, SIZE, bias=False, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    return lin.to("cpu")


def gguf_layer(name: str) -> Callable[[torch.Tensor], torch.nn.Module]:
    def make(w: torch.Tensor) -> torch.nn.Module:
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

        qtype = gguf.GGMLQuantizationType[name]
        data = torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype))
        lin = GGUFLinear(SIZE, SIZE, bias=False, compute_dtype=torch.float32)
        lin.weight = GGUFParameter(data, quant_type=qtype)
        return lin

    return make


FORMATS: dict[str, Callable[[torch.Tensor], torch.nn.Module]] = {
    "torchao int8 (per row)": torchao_layer("int8"),
    "torchao float8 e4m3 (per row)": torchao_layer("float8"),
    "torchao int4 (intx, group 32)": torchao_layer("int4"),
    "bitsandbytes Linear8bitLt": bnb8_layer,
    "bitsandbytes nf4 (block 64, double-quantized)": bnb4_layer("nf4"),
    "bitsandbytes fp4 (block 64, double-quantized)": bnb4_layer("fp4"),
    "GGUF Q8_0": gguf_layer("Q8_0"),
    "GGUF Q5_1": gguf_layer("Q5_1"),
    "GGUF Q5_0": gguf_layer("Q5_0"),
    "GGUF Q4_1": gguf_layer("Q4_1"),
    "GGUF Q4_0": gguf_layer("Q4_0"),
}


def loss(make: Callable[[torch.Tensor], torch.nn.Module], ratio: float, seed: int) -> tuple[float, float]:
    """(lost fraction with a fresh requantization, lost fraction of the backend's merge)."""
    from zimage_lora.backends import backend_for

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SIZE, SIZE, generator=g) / SIZE**0.5
    delta = torch.randn(SIZE, RANK, generator=g) @ torch.randn(RANK, SIZE, generator=g)
    layer = make(w)
    backend = backend_for(layer)
    base = backend.get_base_weight(layer)
    delta *= ratio * base.norm() / delta.norm()
    fresh = make(base + delta)
    lost_fresh = float((backend.get_base_weight(fresh) - base - delta).norm() / delta.norm())
    backend.set_base_weight(layer, base + delta)
    return lost_fresh, float((backend.get_base_weight(layer) - base - delta).norm() / delta.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.02, 0.05, 0.2])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    print("| format | " + " | ".join(f"‖dW‖/‖W‖ = {r:g}: fresh → merge" for r in args.ratios) + " |")
    print("|" + "---|" * (len(args.ratios) + 1))
    for name, make in FORMATS.items():
        cells = []
        for r in args.ratios:
            runs = [loss(make, r, s) for s in range(args.seeds)]
            fresh, merged = (statistics.median(x[i] for x in runs) for i in (0, 1))
            cells.append(f"{fresh:.1%} → {merged:.1%}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
