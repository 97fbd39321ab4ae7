"""`zimage-lora generate`: text-to-image with ZImagePipeline and adapters."""

from __future__ import annotations

import argparse

SUMMARY = "generate an image with adapters (ZImagePipeline)"

HELP = """Generate an image with diffusers' ZImagePipeline and one or more adapters, dynamic (wrapped
layers, base weights untouched) or merged. Works offline when the model is in the Hugging Face cache.

examples:
  zimage-lora generate --prompt "a lighthouse at dusk" --lora style.safetensors:0.9 --out lighthouse.png
  zimage-lora generate --prompt "a red fox" --lora a.safetensors --lora b.safetensors:0.5 --mode merged \\
      --seed 7 --width 768 --height 1280 --out fox.png
  zimage-lora generate --prompt "a red fox" --lora style.safetensors --quantize int8 --out fox.png
  zimage-lora generate --prompt "a red fox" --lora style.safetensors:0.8 --blocks "layers.0-9=0.4,noise_refiner=0" \
      --out fox.png
  zimage-lora generate --prompt "a red fox" --lora style.safetensors:0.8 --schedule "0:1.0,0.6:0.3" --out fox.png
  zimage-lora generate --prompt "a knight and a wizard" --lora knight.safetensors --lora wizard.safetensors \
      --region 1=0,0,0.5,1 --region 2=0.5,0,1,1 --out duel.png
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..tools.generate import DEFAULT_MODEL, DTYPES, QUANTIZE

    p = sub.add_parser(
        "generate", help=SUMMARY, description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prompt", required=True)
    p.add_argument("--lora", action="append", default=[], metavar="SOURCE[:SCALE]",
                   help="adapter file, folder or hub id with an optional scale (any float); repeat to stack")
    p.add_argument("--blocks", metavar="PATTERN=N,...|FILE.json",
                   help="per-block strengths multiplying each --lora's scale, e.g. 'layers.0-9=0.4,noise_refiner=0' "
                        "(module names or prefixes, block ranges, attention/feed_forward/adaLN, early/middle/late)")
    p.add_argument("--schedule", metavar="FRACTION:FACTOR,...",
                   help="per-step factor on each --lora's scale over the denoising run, linear between points, "
                        "e.g. '0:1.0,0.6:0.3' (full strength first, 0.3 from 60%% of the steps on)")
    p.add_argument("--region", action="append", default=[], metavar="N=X0,Y0,X1,Y1|N=MASK.png",
                   help="the N-th --lora (from 1) acts only in this box (fractions of the image) or where this "
                        "grayscale image is white (soft values allowed); dynamic mode; repeat per adapter")
    p.add_argument("--region-caption", default="mean", metavar="mean|NUMBER",
                   help="weight of the caption tokens for adapters with a --region (default: the mask's mean)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"pipeline folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--mode", choices=["dynamic", "merged"], default="dynamic")
    p.add_argument("--quantize", choices=QUANTIZE, help="torchao weight-only quantization of the transformer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=9, help="denoising steps (default 9, for Turbo)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--guidance", type=float, default=0.0, help="CFG scale (Turbo: 0)")
    p.add_argument("--negative-prompt")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--filename", help="file inside the --lora folder or hub repository (one --lora)")
    p.add_argument("--revision", help="hub branch, tag or commit of the --lora repository (one --lora)")
    p.add_argument("--out", required=True, help="image path (.png, .jpg, ...)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..tools.generate import generate
    from .output import console as make_console

    console = make_console()  # the summary is the command's output; warnings and errors go to stderr
    result = generate(
        args.prompt, args.lora, out=args.out, model=args.model, mode=args.mode, quantize=args.quantize,
        seed=args.seed, steps=args.steps, width=args.width, height=args.height, guidance=args.guidance,
        negative_prompt=args.negative_prompt, dtype=args.dtype, device=args.device, progress=not args.quiet,
        overwrite=args.overwrite, filename=args.filename, revision=args.revision, blocks=args.blocks,
        schedule=args.schedule, regions=args.region, region_caption=args.region_caption,
    )
    for r in result.adapters:
        console.print(f"{r.name}: {len(r.applied)} modules ({r.mode}, x{r.scale:g}), {len(r.unmatched)} unmatched")
    console.print(f"wrote {result.out} in {result.seconds:.1f} s")
    return 0
