"""`zimage-lora demo`: every supported layout on a small embedded model, merged and dynamic."""

from __future__ import annotations

import argparse

SUMMARY = "apply an example adapter of every layout to a tiny model"

HELP = """Build a small Z-Image transformer and an example adapter in every supported file layout (in a
temporary folder), apply each one merged and dynamic, and print what was detected, what changed, and
whether removing it restored every weight bit for bit. Offline; exit code 0 only if every row passed.

examples:
  zimage-lora demo
  zimage-lora demo --layouts kohya,lycoris-lokr,peft-dora
  zimage-lora demo --keep ./demo_adapters     # keep the example files to inspect or convert
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help=SUMMARY, description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--layouts", help="comma-separated layout ids (default: all)")
    p.add_argument("--keep", metavar="DIR", help="write the example adapters here and keep them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object (every row and the verdict)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.demo import demo_summary, print_table, run_demo

    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()] if args.layouts else None
    rows = run_demo(layouts, workdir=args.keep, seed=args.seed)
    if args.json:
        from .output import emit_json

        emit_json(demo_summary(rows))
    else:
        print_table(rows)
    return 0 if all(r.passed for r in rows) else 1
