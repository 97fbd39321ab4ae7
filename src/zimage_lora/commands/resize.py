"""`zimage-lora resize`: one adapter as a lower-rank LoRA."""

from __future__ import annotations

import argparse

SUMMARY = "a lower-rank LoRA of one adapter (fixed rank, energy, kohya sv_fro / sv_ratio / sv_cumulative)"

HELP = """Write a lower-rank LoRA of SOURCE, per module: the best approximation of the chosen rank
(truncated SVD; a LoRA from its factors, LoKr / LoHa / full diffs from the dense delta).

rules (one of the last four; --rank alone, or as the cap of another, as kohya's --new_rank):
  --rank R        at most R singular values per module
  --energy E      the fewest values holding fraction E of the squared norm (error <= sqrt(1 - E))
  --fro F         kohya sv_fro: fraction F of the Frobenius norm
  --ratio X       kohya sv_ratio: values larger than the largest / X
  --cumulative C  kohya sv_cumulative: fraction C of the sum of the values

examples:
  zimage-lora resize style.safetensors --rank 16 --out style_r16.safetensors
  zimage-lora resize style.safetensors --fro 0.95 --rank 32 --out style_small.safetensors --dtype bf16
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..tools.convert import FORMATS
    from .combine import add_output_options, add_rule_options

    p = sub.add_parser("resize", help=SUMMARY, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="adapter file, folder or hub id")
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for --to peft)")
    add_rule_options(p, kohya=True)
    add_output_options(p, FORMATS)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..arithmetic.resize import resize_report
    from ..tools.output import check_out
    from .combine import finish

    check_out(Path(args.out), args.overwrite)
    adapter, report = resize_report(
        args.source, rank=args.rank, energy=args.energy, fro=args.fro, ratio=args.ratio, cumulative=args.cumulative,
        model=args.model, dtype=args.dtype, show_progress=not (args.quiet or args.json))
    finish(args, adapter, report)
    return 0
