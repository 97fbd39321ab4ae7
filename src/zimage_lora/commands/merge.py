"""`zimage-lora merge`: bake adapters into a base checkpoint, streaming, and write a new one."""

from __future__ import annotations

import argparse

SUMMARY = "bake adapters into a checkpoint (streaming)"

HELP = """Merge one or more adapters into a Z-Image transformer checkpoint and write the result.

Input: a diffusers transformer folder (config.json + safetensors shards + index), a pipeline folder,
a hub id already in the Hugging Face cache, or one .safetensors file (ComfyUI-style, fused qkv).
Output: a folder --out gets the input's layout (diffusers shards + index); an --out ending in
.safetensors gets one file, in the key layout --layout names: comfyui (native names, q/k/v fused into
attention.qkv: ComfyUI's models/diffusion_models/), diffusers (ZImageTransformer2DModel names, q/k/v
split), or same (default: the input's own names; a diffusers folder gives diffusers names).
Tensors are streamed one at a time (memory stays far below the model size) and written to a
temporary path that is renamed into place at the end, so an interrupted merge leaves nothing at --out.
With --overwrite a file is replaced in one rename and a folder swapped with the old one in one atomic
exchange (Linux), so a kill leaves the old or the new output at --out; leftovers of a killed merge
(.NAME.partial-PID) are removed by the next merge to the same place.

examples:
  zimage-lora merge --model ./Z-Image-Turbo/transformer --lora style.safetensors:0.8 --out merged/
  zimage-lora merge --model Tongyi-MAI/Z-Image-Turbo --lora a.safetensors --lora b.safetensors:-0.3 \\
      --out merged.safetensors --dtype bf16
  zimage-lora merge --model z_image_turbo_bf16.safetensors --lora style.safetensors --out z_style.safetensors
  zimage-lora merge --model ./Z-Image-Turbo/transformer --lora style.safetensors --out z_style.safetensors \\
      --layout comfyui
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "merge", help=SUMMARY, description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="transformer folder, pipeline folder, hub id, or .safetensors file")
    p.add_argument(
        "--lora", action="append", required=True, metavar="SOURCE[:SCALE]",
        help="adapter file, folder or hub id with an optional scale (any float); repeat to stack",
    )
    p.add_argument("--out", required=True, help="output folder, or a .safetensors file")
    p.add_argument("--dtype", default="keep", choices=["keep", "bf16", "fp16", "fp32"],
                   help="dtype of the floating-point tensors written (default: keep each tensor's own)")
    p.add_argument("--layout", default="same", choices=["same", "comfyui", "diffusers"],
                   help="key layout of a single-file --out: comfyui (fused qkv), diffusers, or same "
                        "(default: the input's own)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--strict", action="store_true", help="fail when any adapter key does not match")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object (what was merged and written)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.checkpoint_merge import merge_checkpoint
    from ..tools.specs import parse_lora_spec

    specs = [parse_lora_spec(s) for s in args.lora]
    report = merge_checkpoint(
        args.model, specs, args.out, dtype=args.dtype, overwrite=args.overwrite, strict=args.strict,
        progress=not (args.quiet or args.json), layout=args.layout,
    )
    from .output import console as make_console

    warn = make_console(stderr=True)
    for note in report.notes:  # warnings (a strength of 0, the same adapter twice) reach people and programs
        warn.print(f"warning: {note}")
    console = make_console()  # the summary is the command's output: stdout, so stderr stays empty on success
    if args.json:
        from .output import emit_json

        emit_json(report)
        return 0
    for a in report.adapters:
        unmatched = f", {a['unmatched']} unmatched keys" if a["unmatched"] else ""
        console.print(f"merged {a['source']} ({a['format']}) x{a['scale']:g}: {a['targets']} targets{unmatched}")
        for key, reason in a["unmatched_sample"]:
            console.print(f"  not merged: {key}: {reason}")
        if a["unmatched"] > len(a["unmatched_sample"]):
            console.print(f"  ... run `zimage-lora inspect {a['source']}` for every unmatched key")
    console.print(
        f"wrote {report.out}: {report.tensors} tensors ({report.merged_tensors} changed), "
        f"{report.bytes_written / 1e6:.1f} MB in {report.seconds:.1f} s"
    )
    return 0
