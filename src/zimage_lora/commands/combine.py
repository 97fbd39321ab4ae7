"""`zimage-lora combine`: several adapters into one LoRA file."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from ..adapter import Adapter
    from ..arithmetic.combine import ArithmeticReport

SUMMARY = "combine adapters into one LoRA (exact stack, truncated SVD, TIES, DARE)"

HELP = """Combine adapters, each at a strength, into one LoRA file.

  concat (default)  the LoRA factors stacked, strengths folded in: applying the result is applying
                    the inputs together, exactly; rank = the sum of the ranks
  --rank R / --energy E   the best rank-R LoRA of the summed delta (or the fewest singular values
                    holding fraction E of its squared norm), per module; LoRA inputs are reduced from
                    their factors, LoKr / LoHa / full diffs from the dense delta (DoRA, OFT, BOFT,
                    GLoRA, IA3 too, given the base weights with --model); the error is reported
  ties, dare, dare_ties   TIES-Merging / DARE per module on the dense deltas (--density, --seed),
                    then to rank R (default: the largest input rank)

Inputs may mix layouts, algorithms and fused / split q/k/v. The file's metadata records the inputs
(file and sha256), strengths, method, rank rule and error.

examples:
  zimage-lora combine style.safetensors:0.8 detail.safetensors:0.5 --out both.safetensors
  zimage-lora combine a.safetensors b.safetensors --rank 32 --out ab_r32.safetensors --to comfy
  zimage-lora combine a.safetensors b.safetensors:0.7 --method ties --density 0.3 --rank 32 --out ab_ties.safetensors
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..tools.convert import FORMATS

    p = sub.add_parser("combine", help=SUMMARY, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="SOURCE[:SCALE]", help="adapters with optional strengths")
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for --to peft)")
    p.add_argument("--method", default="concat", choices=["concat", "ties", "dare", "dare_ties"])
    add_rule_options(p, kohya=False)
    p.add_argument("--density", type=float, help="ties / dare: fraction of values kept per input (default 1)")
    p.add_argument("--seed", type=int, default=0, help="dare: seed of the drop masks (default 0)")
    add_output_options(p, FORMATS)
    p.set_defaults(run=run)


def add_rule_options(p: argparse.ArgumentParser, *, kohya: bool) -> None:
    p.add_argument("--rank", type=int, help="keep at most R singular values per module")
    p.add_argument("--energy", type=float, help="keep the fewest singular values holding fraction E of ||delta||^2")
    if kohya:
        p.add_argument("--fro", type=float, help="kohya sv_fro: keep fraction F of the Frobenius norm")
        p.add_argument("--ratio", type=float, help="kohya sv_ratio: keep values above largest / RATIO")
        p.add_argument("--cumulative", type=float, help="kohya sv_cumulative: keep fraction C of the sum of values")


def add_output_options(p: argparse.ArgumentParser, formats: Sequence[str]) -> None:
    p.add_argument("--to", default="kohya", choices=formats, help="output layout (default: kohya)")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="dtype of the written factors (default: the inputs')")
    p.add_argument("--model", help="diffusers transformer folder or config.json (default: Z-Image-Turbo); a "
                   "checkpoint (a folder with its weights, or a .safetensors file) also gives the base weights "
                   "that DoRA, OFT, BOFT, GLoRA and IA3 inputs need")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object (what was written and the errors)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..arithmetic.combine import combine_report
    from ..tools.output import check_out

    check_out(Path(args.out), args.overwrite)  # before any work
    adapter, report = combine_report(
        args.inputs, method=args.method, rank=args.rank, energy=args.energy, density=args.density, seed=args.seed,
        model=args.model, dtype=args.dtype, show_progress=not (args.quiet or args.json))
    finish(args, adapter, report)
    return 0


def finish(args: argparse.Namespace, adapter: Adapter, report: ArithmeticReport) -> None:
    """Write the result and tell: one JSON object, or a few lines (the worst modules by error)."""
    from ..arithmetic.common import save
    from .output import console, emit_json

    out = save(adapter, args.out, to=args.to, overwrite=args.overwrite)
    report.out = str(out)
    report.extra["file_bytes"] = _size(out)
    if args.json:
        emit_json(report.as_dict())
        return
    warn = console(stderr=True)
    for note in report.notes:
        warn.print(f"warning: {note}")
    c = console()
    ranks = [m["rank"] for m in report.modules]
    low, high = (min(ranks), max(ranks)) if ranks else (0, 0)
    span = f"rank {low}-{high}" if low != high else f"rank {low}"
    size = f"tensors {report.bytes_before / 1e6:.2f} MB -> " if report.bytes_before else "tensors "
    c.print(f"wrote {out} ({args.to}): {len(adapter.targets)} targets, {span}, "
            f"{size}{report.bytes_after / 1e6:.2f} MB, relative error {report.error:.2%} in {report.seconds:.1f} s")
    for m in sorted(report.modules, key=lambda m: -m["error"])[:5]:
        if m["error"] > 0:
            c.print(f"  {m['module']}: rank {m['rank']}, error {m['error']:.2%}")


def _size(path: str | Path) -> int:
    from pathlib import Path

    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
