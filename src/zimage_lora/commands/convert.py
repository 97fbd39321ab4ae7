"""`zimage-lora convert`: rewrite an adapter into another key layout."""

from __future__ import annotations

import argparse

SUMMARY = "rewrite an adapter into another key layout"

HELP = """Rewrite an adapter into another layout. LoRA converts exactly; q/k/v are split or fused as
the target needs; what a layout cannot hold is refused with the reason (e.g. LoKr into PEFT keys).

layouts:
  diffusers  transformer.<module>.lora_A/lora_B, alpha in the lora_adapter_metadata field (LoRA, DoRA)
  kohya      lora_unet_<module> + lora_down/lora_up + .alpha; LoKr, LoHa, diffs keep their suffixes
  comfy      diffusion_model.<native module>, q/k/v fused into attention.qkv (shared down, or
             block-diagonal when the downs differ), + .alpha; LoKr, LoHa, diffs too
  peft       a PEFT folder: adapter_model.safetensors + adapter_config.json (LoRA, DoRA)

examples:
  zimage-lora convert style.safetensors --to diffusers --out style_diffusers.safetensors
  zimage-lora convert ./peft_folder --to comfy --out style_comfy.safetensors
  zimage-lora convert style.safetensors --to peft --out ./style_peft
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..tools.convert import FORMATS

    p = sub.add_parser(
        "convert", help=SUMMARY, description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a .safetensors file, a folder (PEFT folders too) or a hub id org/name")
    p.add_argument("--to", required=True, choices=FORMATS, help="target layout")
    p.add_argument("--out", required=True, help="output .safetensors file (a folder for --to peft)")
    p.add_argument("--filename", help="file inside a folder or hub repository")
    p.add_argument("--model", help="diffusers transformer folder or config.json (default: Z-Image-Turbo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object (what was written) instead of a line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..inventory import inventory_model, load_config
    from ..loading import load_adapter
    from ..numerics import one_thread
    from ..tools.convert import convert_adapter

    with one_thread():
        adapter = load_adapter(args.source, inventory_model(load_config(args.model)), filename=args.filename)
        out = convert_adapter(adapter, args.to, args.out, overwrite=args.overwrite)
    if args.json:
        from .output import emit_json

        emit_json({
            "source": adapter.source, "format": adapter.format, "modules": len(adapter.modules),
            "out": str(out), "to": args.to,
            "unmatched": [{"key": u.key, "reason": u.reason} for u in adapter.unmatched],
        })
        return 0
    from .output import console

    skipped = f"; {len(adapter.unmatched)} unmatched keys not carried over" if adapter.unmatched else ""
    what = f"{adapter.source} ({adapter.format}, {len(adapter.modules)} modules)"
    console().print(f"{what} -> {out} ({args.to}){skipped}")
    return 0
