"""`zimage-lora convert`: rewrite an adapter into another key layout."""

from __future__ import annotations

import argparse

SUMMARY = "rewrite an adapter into another key layout"

HELP_HEAD = """Rewrite an adapter for the application that will load it. LoRA converts exactly; q/k/v are
split or fused as the target needs; what a target cannot hold is refused with the reason (e.g. LoKr
into PEFT keys). Every written key is checked against the key rules of the application the target
names: a module it would skip is an error, and nothing is written. Where ComfyUI computes part of the
adapter differently from its trainer (DoRA per output row), a warning says how.

targets (--to):
"""

EXAMPLES = """
examples:
  zimage-lora convert style.safetensors --to comfyui --out style_comfyui.safetensors
  zimage-lora convert style.safetensors --to diffusers --out style_diffusers.safetensors
  zimage-lora convert style.safetensors --to peft --out ./style_peft
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..tools import targets
    from ..tools.convert import FORMATS

    p = sub.add_parser(
        "convert", help=SUMMARY, description=HELP_HEAD + targets.help_table() + "\n" + EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a .safetensors file, a folder (PEFT folders too) or a hub id org/name")
    p.add_argument("--to", required=True, choices=FORMATS, help="the application the file is for (see above)")
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for --to peft)")
    p.add_argument("--filename", help="file inside a folder or hub repository")
    p.add_argument("--model", help="diffusers transformer folder or config.json (default: Z-Image-Turbo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object (what was written) instead of a line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import sys
    import warnings

    from ..inventory import inventory_model, load_config
    from ..loading import load_adapter
    from ..numerics import one_thread
    from ..tools.convert import ComfyUIDifferenceWarning, convert_adapter

    inventory = inventory_model(load_config(args.model))
    with one_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ComfyUIDifferenceWarning)
        adapter = load_adapter(args.source, inventory, filename=args.filename)
        out = convert_adapter(adapter, args.to, args.out, model=inventory, overwrite=args.overwrite)
    notes = [str(w.message) for w in caught if issubclass(w.category, ComfyUIDifferenceWarning)]
    for w in caught:
        if not issubclass(w.category, ComfyUIDifferenceWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        from .output import emit_json

        emit_json({
            "source": adapter.source, "format": adapter.format, "modules": len(adapter.modules),
            "out": str(out), "to": args.to, "warnings": notes,
            "unmatched": [{"key": u.key, "reason": u.reason} for u in adapter.unmatched],
        })
        return 0
    from .output import console

    skipped = f"; {len(adapter.unmatched)} unmatched keys not carried over" if adapter.unmatched else ""
    what = f"{adapter.source} ({adapter.format}, {len(adapter.modules)} modules)"
    console().print(f"{what} -> {out} ({args.to}){skipped}")
    return 0
