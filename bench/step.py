"""The cost users feel: one denoising step of a reduced-depth, full-width Z-Image transformer with 0, 1,
2 and 4 rank-32 LoRA adapters, as % over the same step without adapters.

    python bench/step.py                 # dim 3840, 2 layers, 1024x1024 image (4096 tokens) + 128 caption tokens
    python bench/step.py --quick         # 1 layer, 256x256 image (256 tokens) + 32 caption tokens
    python bench/step.py --device cuda --dtype bf16

Cases, each on its own copy of the same random model (real width, `--layers` main blocks, no refiner
blocks), every adapter on the 7 full-width Linears of every block (attention q/k/v/out, feed-forward
w1/w2/w3), the same factors for every library:
- ours dynamic: `apply_adapter(mode="dynamic")` x4, the active set switched with `set_active_adapters`;
- ours merged: `apply_adapter(mode="merged")` x4 on the base copy, switched the same way (re-merged from
  the kept originals; with none active the weights are the originals again, which is the base case);
- diffusers+PEFT dynamic: `transformer.load_lora_adapter` x4, switched with `set_adapters`
  (`disable_lora` for 0).
Switching happens between timed calls, never inside one. Each round times every case once, in an
order rotated each round, each right after a base step of its own (on a shared machine, load drifts
within seconds); a case's overhead is the median over rounds of its time / that paired base time.
Outputs are checked against each other once before timing (relative to the adapters' effect), which
also warms every case up. On a CPU shared with other jobs, wall time mostly measures how long the
scheduler kept us waiting, so the overheads there use the process's CPU time (all threads) by default
(`--clock`); both clocks are recorded.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import dtype_of, machine, md_table, save, sync  # noqa: E402
from merge import FULL_WIDTH, build_model  # noqa: E402

COUNTS = (0, 1, 2, 4)
RANK = 32


def _factors(model: torch.nn.Module, names: list[str], seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        w = model.get_submodule(n).weight
        a = torch.randn(RANK, w.shape[1], generator=g) / math.sqrt(w.shape[1])
        b = torch.randn(w.shape[0], RANK, generator=g) * 0.02
        out[n] = (a, b)
    return out


def _inputs(image: int, caption: int, cfg, dtype: torch.dtype, device: str) -> tuple:
    g = torch.Generator().manual_seed(0)
    side = image // 8  # the VAE's 8x downsampling; the transformer patchifies 2x2 on top
    x = [torch.randn(cfg.in_channels, 1, side, side, generator=g).to(device, dtype)]
    cap = [torch.randn(caption, cfg.cap_feat_dim, generator=g).to(device, dtype)]
    return x, torch.tensor([0.5], device=device, dtype=dtype), cap


def _ours(model: torch.nn.Module, adapters: list[dict], mode: str) -> list[str]:
    from zimage_lora import Adapter, Target, apply_adapter
    from zimage_lora.adapter import Provenance

    names = []
    for i, factors in enumerate(adapters):
        targets = [Target(module=n, algorithm="lora", tensors={"down": a, "up": b}, scale=1.0, rank=RANK,
                          about=Provenance(alpha=float(RANK))) for n, (a, b) in factors.items()]
        name = f"a{i}"
        apply_adapter(model, Adapter(name=name, format="bench", source="bench", targets=targets), mode=mode, name=name)
        names.append(name)
    return names


def _peft(model: torch.nn.Module, adapters: list[dict], dtype: torch.dtype) -> list[str]:
    names = []
    for i, factors in enumerate(adapters):
        sd = {}
        for n, (a, b) in factors.items():
            sd[f"transformer.{n}.lora_A.weight"] = a.to(dtype)
            sd[f"transformer.{n}.lora_B.weight"] = b.to(dtype)
        model.load_lora_adapter(sd, adapter_name=f"a{i}", prefix="transformer")
        names.append(f"a{i}")
    return names


def build_cases(layers: int, image: int, caption: int, dtype: torch.dtype, device: str) -> tuple[dict, dict]:
    """{case: (setup, step)} and facts about the setup."""
    from zimage_lora import set_active_adapters

    merged_model = build_model(layers, dtype, device)
    ours_model = build_model(layers, dtype, device)
    peft_model = build_model(layers, dtype, device)
    targets = [f"layers.{i}.{m}" for i in range(layers) for m in FULL_WIDTH]
    adapters = [_factors(merged_model, targets, seed=10 + i) for i in range(max(COUNTS))]
    x, t, cap = _inputs(image, caption, merged_model.config, dtype, device)

    merged_names = _ours(merged_model, adapters, "merged")
    ours_names = _ours(ours_model, adapters, "dynamic")
    peft_names = _peft(peft_model, adapters, dtype)

    def step(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model(x, t, cap, return_dict=False)[0][0]

    def ours_setup(model: torch.nn.Module, names: list[str], k: int) -> Callable[[], None]:
        return lambda: set_active_adapters(model, names[:k])

    def peft_setup(k: int) -> Callable[[], None]:
        def setup() -> None:
            if k == 0:
                peft_model.disable_lora()
            else:
                peft_model.enable_lora()
                peft_model.set_adapters(peft_names[:k], [1.0] * k)

        return setup

    cases: dict[str, tuple[Callable[[], None], Callable[[], torch.Tensor]]] = {
        "base": (ours_setup(merged_model, merged_names, 0), step(merged_model))
    }
    for k in COUNTS:
        cases[f"ours-dynamic-{k}"] = (ours_setup(ours_model, ours_names, k), step(ours_model))
        if k:
            cases[f"ours-merged-{k}"] = (ours_setup(merged_model, merged_names, k), step(merged_model))
        cases[f"peft-dynamic-{k}"] = (peft_setup(k), step(peft_model))
    tokens = (image // 16) ** 2
    facts = {"layers": layers, "dim": merged_model.config.dim, "image": image, "image_tokens": tokens,
             "caption_tokens": caption, "rank": RANK, "targets_per_adapter": len(targets),
             "params_m": sum(p.numel() for p in merged_model.parameters()) / 1e6}
    return cases, facts


def check(cases: dict) -> dict[str, float]:
    """Per adapter count, how far ours (dynamic, merged) is from PEFT, relative to PEFT's adapter effect."""
    outs = {}
    with torch.no_grad():
        for name, (setup, fn) in cases.items():
            setup()
            outs[name] = fn().float()
    base = outs["base"]
    errs = {}
    for k in COUNTS[1:]:
        effect = (outs[f"peft-dynamic-{k}"] - base).norm()
        for kind in ("dynamic", "merged"):
            errs[f"ours-{kind}-{k}"] = float((outs[f"ours-{kind}-{k}"] - outs[f"peft-dynamic-{k}"]).norm() / effect)
    return errs


def run(cases: dict, device: str, rounds: int, log=print) -> dict[str, dict[str, list[float]]]:
    """{clock: {case: seconds per round}}; "base:<case>" holds the base step timed just before that case."""
    names = [n for n in cases if n != "base"]
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}

    def timed(name: str, key: str) -> None:
        setup, fn = cases[name]
        setup()
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times["wall"].setdefault(key, []).append(time.perf_counter() - w0)
        times["cpu"].setdefault(key, []).append(time.process_time() - c0)

    with torch.no_grad():
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                timed("base", f"base:{n}")
                timed(n, n)
            log(f"  round {r + 1}/{rounds}: base {statistics.median(times['wall'][f'base:{names[0]}']):.2f} s wall")
    return times


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per case: median seconds and the median over rounds of (case / its paired base step - 1), in %."""
    bases = [t for n, ts in times.items() if n.startswith("base:") for t in ts]
    out = {"base": {"median_s": statistics.median(bases)}}
    for n, ts in times.items():
        if not n.startswith("base:"):
            ratio = statistics.median(a / b for a, b in zip(ts, times[f"base:{n}"], strict=True))
            out[n] = {"median_s": statistics.median(ts), "over_base_pct": (ratio - 1) * 100}
    return out


def table(summary: dict) -> str:
    rows = []
    for k in COUNTS:
        row = [k]
        for kind in ("ours-dynamic", "ours-merged", "peft-dynamic"):
            cell = summary.get(f"{kind}-{k}")
            row.append(cell["over_base_pct"] if cell else (0.0 if kind == "ours-merged" else None))
        rows.append(row)
    return md_table(["adapters", "ours dynamic %", "ours merged %", "diffusers+PEFT dynamic %"], rows)


def chart(summary: dict, width: int = 40) -> str:
    """A text bar chart of the overheads (one bar per case, scaled to the largest)."""
    cells = [(f"{k} x {kind}", summary[f"{kind}-{k}"]["over_base_pct"])
             for k in COUNTS[1:] for kind in ("ours-dynamic", "ours-merged", "peft-dynamic")]
    top = max(max(abs(v) for _n, v in cells), 1e-9)
    lines = []
    for name, v in cells:
        bar = "#" * max(0, round(width * v / top))
        lines.append(f"{name:<17} {v:+7.1f}% {bar}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 layer, 256x256 image, 32 caption tokens")
    p.add_argument("--layers", type=int, default=None, help="main blocks (default 2; --quick 1)")
    p.add_argument("--image", type=int, default=None, help="image side in pixels (default 1024; --quick 256)")
    p.add_argument("--caption", type=int, default=None, help="caption tokens (default 128; --quick 32)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2; --quick 5)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--clock", default=None, choices=["cpu", "wall"],
                   help="clock for the overheads (default: cpu time on --device cpu, wall time on cuda)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    layers = args.layers or (1 if args.quick else 2)
    image = args.image or (256 if args.quick else 1024)
    caption = args.caption or (32 if args.quick else 128)
    rounds = args.rounds or (5 if args.quick else 2)
    info = machine(args.device)
    print(f"# machine: {info}", flush=True)
    cases, facts = build_cases(layers, image, caption, dtype_of(args.dtype), args.device)
    print(f"# {facts}", flush=True)
    errs = check(cases)
    print(f"# ours vs PEFT (relative to the adapters' effect): {errs}", flush=True)
    t0 = time.perf_counter()
    times = run(cases, args.device, rounds)
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    summaries = {c: summarise(ts) for c, ts in times.items()}
    summary = summaries[clock]
    tbl = table(summary)
    text = "\n".join([
        f"machine: {info}", "",
        f"one step, {facts['layers']} x dim {facts['dim']} blocks, {facts['image']}x{facts['image']} image "
        f"({facts['image_tokens']} tokens) + {facts['caption_tokens']} caption tokens, {args.dtype} {args.device}, "
        f"rank-{RANK} adapters on {facts['targets_per_adapter']} Linears each; base step "
        f"{summaries['wall']['base']['median_s']:.2f} s wall, {summaries['cpu']['base']['median_s']:.2f} s CPU "
        f"(medians of {rounds} rounds); overheads from {clock} time", "", tbl, "", "```", chart(summary), "```",
        "", "the other clock:", "", table(summaries["wall" if clock == "cpu" else "cpu"]),
    ])
    name = f"step-{args.device}-{args.dtype}" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    payload = {"facts": facts, "dtype": args.dtype, "rounds": rounds, "clock": clock, "times_s": times,
               "summary": summaries,
               "rel_err_vs_peft": errs, "machine": info | {"load_avg_end": __import__("os").getloadavg()[0]},
               "wall_s": time.perf_counter() - t0}
    path = save(name, payload, text)
    print(text, flush=True)
    print(f"-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
