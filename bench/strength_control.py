"""Costs of strength control: a per-block strength change on Z-Image-Turbo's 276 Linear names (tiny
widths: 30 main + 2x2 refiner blocks) against a one-number change; a 9-step run of the tiny
pipeline with a per-step schedule against the same run without one (dynamic mode); and the per-row
(regional) LoRA path against the plain dynamic one on Turbo-width layers (box and soft masks).

    PYTHONPATH=src python bench/strength_control.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, interleaved, machine, md_table, median, median_ratio

import zimage_lora as zl
from zimage_lora.examples import linear_names, make_adapter, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny pipeline builder


def _per_call(fn, n: int = 200, batches: int = 9) -> float:
    out = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        out.append((time.perf_counter() - t0) / n)
    return median(out)


def per_block_switch(tmp: Path) -> dict[str, float]:
    model = tiny_model(0, n_layers=30, n_refiner_layers=2)
    f = make_adapter("diffusers", tmp / "a.safetensors", model, rank=4)
    zl.apply_adapter(model, f, name="a")
    specs = ({"*": 0.8, "layers.0-9": 0.4, "noise_refiner": 0.0}, {"*": 0.6, "layers.0-9": 0.9, "noise_refiner": 0.5})
    presets = ({"*": 0.0, "early": 1.0}, {"*": 0.0, "late": 1.0})
    out = {"layers wrapped": float(len(linear_names(model)))}
    out["one number (set_adapter_scale)"] = _per_call(lambda i: zl.set_adapter_scale(model, "a", (0.3, 0.7)[i & 1]))
    for spec in specs + presets:
        zl.set_adapter_scale(model, "a", spec)  # every module that ever differs has its own strength from here on
    out["per block, same patterns"] = _per_call(lambda i: zl.set_adapter_scale(model, "a", specs[i & 1]))
    out["per block, early <-> late presets"] = _per_call(lambda i: zl.set_adapter_scale(model, "a", presets[i & 1]))
    out["back to one number after per-block"] = _per_call(lambda i: zl.set_adapter_scale(model, "a", (0.3, 0.7)[i & 1]))
    return out


def schedule_run(tmp: Path, rounds: int) -> dict[str, float]:
    from _tiny_pipeline import tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    f = make_adapter("diffusers", tmp / "p.safetensors", pipe.transformer, rank=4)
    zl.apply_adapter(pipe, f, scale={"*": 0.8, "layers.0": 0.5}, name="style")

    def run() -> None:
        pipe("a red cat", height=64, width=64, num_inference_steps=9, guidance_scale=0.0,
             generator=torch.Generator().manual_seed(0), output_type="latent")

    def scheduled() -> None:
        with zl.schedule(pipe, {"style": [(0.0, 1.0), (0.6, 0.3)]}):
            run()

    times = interleaved({"plain": run, "scheduled": scheduled}, "cpu", rounds=rounds, inner=1)
    return {"plain 9-step run (s)": median(times["plain"]), "scheduled 9-step run (s)": median(times["scheduled"]),
            "scheduled / plain (median of per-round ratios)": median_ratio(times["scheduled"], times["plain"])}


def _layer_cases(width_out: int, rows: int, rank: int) -> dict:
    """Base alone, plain dynamic, per-row with a box mask (0/1 rows) and with a soft mask, on one
    Linear(3840 -> width_out) with a rank-`rank` LoRA."""
    from torch import nn

    from zimage_lora.adapter import Adapter, Target
    from zimage_lora.apply.regional import _add_rows

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3840, width_out, bias=False))
    target = Target("0", "lora", {"down": torch.randn(rank, 3840) / 60, "up": torch.randn(width_out, rank) / 6})
    zl.apply_adapter(model, Adapter(name="a", format="bench", source="bench", targets=[target]), name="a")
    base, slot = model[0].base_layer, model[0]._active[0][0]
    x = torch.randn(rows, 3840)
    box = torch.zeros(rows)
    box[rows // 4: rows // 2] = 1.0
    soft = torch.rand(rows)

    def plain() -> None:
        slot.add_(base(x), x, None, 1.0)

    def per_row(w: torch.Tensor):
        return lambda: _add_rows(slot, base(x), x, None, w, 1.0)

    return {"base": lambda: base(x), "plain dynamic": plain, "per-row box": per_row(box), "per-row soft": per_row(soft)}


def per_row_layer(rounds: int, rows: int = 1024, rank: int = 32) -> dict[str, float]:
    """Turbo-width layers: attention's 3840 -> 3840 and the feed-forward's 3840 -> 10240."""
    out: dict[str, float] = {}
    for width_out in (3840, 10240):
        times = interleaved(_layer_cases(width_out, rows, rank), "cpu", rounds=rounds, inner=1)
        tag = f"{rows}x3840->{width_out}, r{rank}"
        out[f"{tag}: plain dynamic (ms)"] = median(times["plain dynamic"]) * 1e3
        out[f"{tag}: per-row box / plain"] = median_ratio(times["per-row box"], times["plain dynamic"])
        out[f"{tag}: per-row soft / plain"] = median_ratio(times["per-row soft"], times["plain dynamic"])
        out[f"{tag}: plain / base"] = median_ratio(times["plain dynamic"], times["base"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        switch = per_block_switch(Path(d))
        sched = schedule_run(Path(d), args.rounds)
    rows_cost = per_row_layer(args.rounds)
    rows = [[k, f"{v * 1e3:.4f}" if k != "layers wrapped" else f"{v:.0f}"] for k, v in switch.items()]
    table = ("Strength changes on 276 wrapped Linear layers (CPU, ms per call, median of 9 batches)\n\n"
             + md_table(["operation", "ms"], rows) + "\n\nTiny pipeline, 64x64, 9 steps, dynamic, per-block strength "
             f"(CPU, 1 thread, {args.rounds} interleaved rounds)\n\n"
             + md_table(["case", "value"], [[k, f"{v:.4f}"] for k, v in sched.items()])
             + "\n\nPer-row (regional) LoRA vs plain dynamic, fp32, 1 thread, median of per-round ratios\n\n"
             + md_table(["case", "value"], [[k, f"{v:.4f}"] for k, v in rows_cost.items()]))
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "strength-control-cpu.md").write_text(table + "\n")
    (RESULTS / "strength-control-cpu.json").write_text(json.dumps(
        {"switch_s": switch, "schedule": sched, "per_row": rows_cost, "machine": machine("cpu")}, indent=1))


if __name__ == "__main__":
    main()
