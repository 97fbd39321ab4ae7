"""Loading + resolving a 276-target rank-r LoRA (bf16, ai-toolkit key layout, Z-Image-Turbo's real shapes)
against the default meta inventory, vs reading the same bytes with safetensors and vs
diffusers' own `lora_state_dict` for Z-Image (key conversion only, no model). The floor for reading and
validating every byte is safetensors' `load_file` plus one `torch.aminmax` pass over each tensor (the page
faults of the mapped file land in that pass). Target: ours <= 1.5x that floor, and faster than diffusers.
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path

import torch
from _common import md_table, median

from zimage_lora.inventory import meta_model


def write_adapter(path: Path, rank: int) -> tuple[int, int]:
    """A random rank-`rank` bf16 LoRA on every Linear of the real Z-Image-Turbo inventory."""
    from safetensors.torch import save_file

    model = meta_model()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            sd[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g).bfloat16()
            sd[f"diffusion_model.{name}.lora_B.weight"] = (torch.randn(m.out_features, rank, generator=g) * 0.01
                                                          ).bfloat16()
    save_file(sd, str(path))
    return len(sd) // 2, path.stat().st_size


def read_and_validate(path: Path) -> dict[str, torch.Tensor]:
    """The floor: map every tensor, then touch every byte once with a NaN/Inf-revealing reduction."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for t in tensors.values():
        torch.aminmax(t)
    return tensors


def run_load(rank: int, rounds: int = 9) -> dict:
    from safetensors.torch import load_file

    from zimage_lora.keys import ModuleIndex
    from zimage_lora.loading import load_adapter

    index = ModuleIndex(meta_model())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "zimage_r32.safetensors"
        n_targets, size = write_adapter(path, rank)
        cases = {
            "read + validate floor: load_file + aminmax per tensor": lambda: read_and_validate(path),
            "safetensors load_file (maps, reads nothing)": lambda: load_file(str(path)),
            "ours: load_adapter(path, ModuleIndex)": lambda: load_adapter(path, index),
        }
        try:
            from diffusers.loaders import ZImageLoraLoaderMixin

            cases["diffusers: ZImageLoraLoaderMixin.lora_state_dict"] = (
                lambda: ZImageLoraLoaderMixin.lora_state_dict(str(path)))
        except ImportError:
            pass
        check = load_adapter(path, index)
        resolved = len(check.targets)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for fn in cases.values():
            fn()  # warm the page cache and imports
        for r in range(rounds):
            names = list(cases)
            for k in names[r % len(names):] + names[: r % len(names)]:
                gc.collect()
                t0 = time.perf_counter()
                out = cases[k]()
                times[k].append(time.perf_counter() - t0)
                del out
        t_ours_cold = time.perf_counter()
        load_adapter(path)  # default inventory, built on the meta device inside the call
        t_ours_cold = time.perf_counter() - t_ours_cold
    floor = "read + validate floor: load_file + aminmax per tensor"
    ratios = {k: median([a / b for a, b in zip(v, times[floor], strict=True)]) for k, v in times.items()}
    rows = [[k, median(v) * 1e3, ratios[k]] for k, v in times.items()]
    rows.append(["ours: load_adapter(path) incl. building the meta inventory (once)", t_ours_cold * 1e3,
                 t_ours_cold / median(times[floor])])
    ours_ratio = ratios["ours: load_adapter(path, ModuleIndex)"]
    diffusers = ratios.get("diffusers: ZImageLoraLoaderMixin.lora_state_dict")
    vs_diffusers = (median([a / b for a, b in zip(times["ours: load_adapter(path, ModuleIndex)"],
                                                 times["diffusers: ZImageLoraLoaderMixin.lora_state_dict"],
                                                 strict=True)]) if diffusers is not None else None)
    for row in rows:
        print(f"  {row[0]}: {row[1]:.1f} ms ({row[2]:.2f}x)", flush=True)
    table = (f"Load + resolve: {n_targets}-target rank-{rank} bf16 LoRA, {size / 1e6:.0f} MB, {resolved} targets "
             f"resolved. Target: ours <= 1.5x the read + validate floor -> {'MET' if ours_ratio <= 1.5 else 'MISSED'} "
             f"({ours_ratio:.2f}x)"
             + ("" if vs_diffusers is None else f"; ours / diffusers {vs_diffusers:.2f}x "
                f"({'faster' if vs_diffusers < 1 else 'NOT faster'})")
             + f". torch threads: {torch.get_num_threads()}.\n\n"
             + md_table(["what", "ms (median)", "x floor (median of per-round ratios)"], rows))
    return {"targets": n_targets, "resolved": resolved, "bytes": size, "ms": {r[0]: r[1] for r in rows},
            "ratio": ratios, "vs_diffusers": vs_diffusers, "table": table}
