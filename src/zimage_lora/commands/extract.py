"""`zimage-lora extract`: a LoRA from the difference of two checkpoints."""

from __future__ import annotations

import argparse

SUMMARY = "a LoRA from the difference of two checkpoints (tuned minus base), streaming"

HELP = """Extract a LoRA of TUNED - BASE, one tensor pair at a time (memory far below the model size):
each Linear weight's difference is reduced by randomized SVD (--oversample, --niter) to --rank R, or
to the fewest singular values holding fraction --energy E of its squared norm. The relative error is
reported per module and in total. With --diffs, changed norm weights and biases are kept as exact diffs.

Both checkpoints must be the same model in the same layout (diffusers folder with shards, or one
.safetensors file with fused q/k/v): the first config field, key, shape or dtype that differs is named.

examples:
  zimage-lora extract --base ./Z-Image/transformer --tuned ./Z-Image-Turbo/transformer --rank 64 \\
      --out turbo_distill_r64.safetensors          # Turbo minus Base: a "distill LoRA"
  zimage-lora extract --base base.safetensors --tuned finetune.safetensors --energy 0.9 --rank 128 \\
      --diffs --to comfy --out finetune_lora.safetensors
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..tools.convert import FORMATS

    p = sub.add_parser("extract", help=SUMMARY, description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base checkpoint: transformer folder, hub id or .safetensors")
    p.add_argument("--tuned", required=True, help="the tuned checkpoint, same model and layout")
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for --to peft)")
    p.add_argument("--rank", type=int, help="at most R singular values per module")
    p.add_argument("--energy", type=float, help="the fewest singular values holding fraction E of ||diff||^2")
    p.add_argument("--diffs", action="store_true", help="keep changed norm weights and biases as exact diffs")
    p.add_argument("--oversample", type=int, default=10, help="randomized SVD: extra subspace width (default 10)")
    p.add_argument("--niter", type=int, default=2, help="randomized SVD: power iterations (default 2)")
    p.add_argument("--seed", type=int, default=0, help="randomized SVD: seed (default 0)")
    p.add_argument("--to", default="kohya", choices=FORMATS, help="output layout (default: kohya)")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="dtype of the written factors (default: the checkpoints')")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object (what was written and the errors)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..arithmetic.extract import extract_report
    from ..tools.output import check_out
    from .combine import finish

    check_out(Path(args.out), args.overwrite)
    adapter, report = extract_report(
        args.base, args.tuned, rank=args.rank, energy=args.energy, diffs=args.diffs, dtype=args.dtype,
        oversample=args.oversample, niter=args.niter, seed=args.seed, show_progress=not (args.quiet or args.json))
    finish(args, adapter, report)
    return 0
