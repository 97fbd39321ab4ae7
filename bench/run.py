"""zimage-lora performance bench: us and the peers (PEFT, diffusers, LyCORIS) in one process, same shapes.

    python bench/run.py all --quick          # small subset, under ~2 minutes on 2 CPU cores
    python bench/run.py lora --dtypes fp32 --tokens 1024 4096
    python bench/run.py merge --layers 6     # 42 full-width bf16 Linears, as in the issue
    python bench/run.py checkpoint           # full-size random bf16 checkpoint (~12 GB on disk)

Every timing is the median over interleaved rounds (order rotated each round); overheads are medians of
per-round ratios to the base matmul timed in the same round. Results land in bench/results/<name>.json/.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, save  # noqa: E402

ALL_SHAPES = ["3840->3840", "3840->10240", "10240->3840"]


def _device(args: argparse.Namespace) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _tag(args: argparse.Namespace, name: str) -> str:
    return f"{name}-{_device(args)}" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")


def _lora_grid(args: argparse.Namespace) -> list[tuple]:
    dev = _device(args)
    if args.quick:
        grid = [("3840->3840", 256, 32, "fp32")]
        if dev == "cuda":
            grid = [(s, n, 32, d) for s in ALL_SHAPES for n in (1024, 4096) for d in ("fp32", "bf16")]
            grid += [("3840->3840", 256, 32, "bf16")] + [("3840->10240", 4096, r, "bf16") for r in (16, 64, 128)]
        return grid
    grid = []
    for dt in args.dtypes:
        for shape in args.shapes:
            for n in args.tokens:
                grid.append((shape, n, 32, dt))
        for r in args.ranks:
            if r != 32:
                grid.append((args.shapes[0], args.tokens[0], r, dt))
    return grid


def cmd_lora(args: argparse.Namespace) -> dict:
    from dynamic import lora_table, run_lora

    rows = run_lora(_lora_grid(args), _device(args), args.rounds)
    return {"rows": rows, "table": lora_table(rows)}


def cmd_lokr(args: argparse.Namespace) -> dict:
    from dynamic import lokr_table, run_lokr

    dev = _device(args)
    if args.quick:
        grid = [("3840->3840", 256, 16, "fp32", f) for f in (False, True)]
        if dev == "cuda":
            grid = [(s, 4096, 16, d, f) for s in ALL_SHAPES for d in ("fp32", "bf16") for f in (False, True)]
    else:
        grid = [(s, n, 16, d, f)
                for d in args.dtypes for s in args.shapes for n in args.tokens[:1] for f in (False, True)]
    rows = run_lokr(grid, dev, args.rounds)
    return {"rows": rows, "table": lokr_table(rows)}


def cmd_merge(args: argparse.Namespace) -> dict:
    from merge import run_merge

    cpu_quick = args.quick and _device(args) == "cpu"
    layers = 1 if cpu_quick else args.layers
    rounds = 1 if cpu_quick else 2 if args.quick else max(2, args.rounds // 2)
    return run_merge(layers, args.rank, _device(args), rounds)


def cmd_switch(args: argparse.Namespace) -> dict:
    from switch import run_switch

    return run_switch(_device(args), repeats=200 if args.quick else 1000)


def cmd_load(args: argparse.Namespace) -> dict:
    from load import run_load

    return run_load(args.rank, rounds=3 if args.quick else 9)


def cmd_checkpoint(args: argparse.Namespace) -> dict:
    from checkpoint import run_checkpoint

    return run_checkpoint(Path(args.workdir), quick=args.quick)


def cmd_compile(args: argparse.Namespace) -> dict:
    from compile_check import run_compile

    return run_compile(_device(args), backend=args.backend)


COMMANDS = {
    "lora": cmd_lora,
    "lokr": cmd_lokr,
    "merge": cmd_merge,
    "switch": cmd_switch,
    "load": cmd_load,
    "compile": cmd_compile,
    "checkpoint": cmd_checkpoint,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", nargs="+", choices=[*COMMANDS, "all"], help="benchmarks to run ('all': every one but "
                   "checkpoint, which writes ~12 GB)")
    p.add_argument("--quick", action="store_true", help="small subset (under ~2 minutes on 2 CPU cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case (medians over them)")
    p.add_argument("--shapes", nargs="+", default=ALL_SHAPES, choices=ALL_SHAPES)
    p.add_argument("--tokens", nargs="+", type=int, default=[256, 1024, 4096])
    p.add_argument("--ranks", nargs="+", type=int, default=[16, 32, 64, 128])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--rank", type=int, default=32, help="LoRA rank for merge and load")
    p.add_argument("--layers", type=int, default=6, help="transformer blocks for merge (7 full-width Linears each)")
    p.add_argument("--workdir", default="/tmp/zimage-lora-bench", help="where the checkpoint bench writes its files")
    p.add_argument("--backend", default="auto", help="torch.compile backend for the recompile check (auto: inductor on "
                   "CUDA, aot_eager on CPU)")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    what = [w for w in COMMANDS if w != "checkpoint"] if "all" in args.what else args.what
    dev = _device(args)
    info = machine(dev)
    print(f"# machine: {info}", flush=True)
    for name in what:
        t0 = time.perf_counter()
        print(f"\n## {name} ({dev}{', quick' if args.quick else ''})", flush=True)
        result = COMMANDS[name](args)
        result["machine"] = info | {"load_avg_end": __import__("os").getloadavg()[0]}
        result["args"] = vars(args)
        table = result.pop("table", "")
        path = save(_tag(args, name), result, f"machine: {info}\n\n{table}")
        print(table, flush=True)
        print(f"-> {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
