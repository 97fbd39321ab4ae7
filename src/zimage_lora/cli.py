"""The `zimage-lora` command line. Each subcommand lives in `commands/<name>.py` with
`add_parser(subparsers)` and `run(args) -> int`; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LoRAError

COMMANDS = ("inspect", "merge", "convert", "generate", "demo", "bench", "serve")

EPILOG = """examples:
  zimage-lora demo
  zimage-lora inspect my_style.safetensors
  zimage-lora inspect org/some-zimage-lora --json
  zimage-lora merge --model ./Z-Image-Turbo/transformer --lora style.safetensors:0.8 --out merged/
  zimage-lora convert style.safetensors --to diffusers --out style_diffusers.safetensors
  zimage-lora generate --prompt "a lighthouse at dusk" --lora style.safetensors:0.9 --out lighthouse.png
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zimage-lora",
        description="LoRA, LoKr, LoHa, DoRA and full-diff adapters for the Z-Image transformer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"zimage-lora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.commands.{name}":
                continue  # command not part of this build
            raise
        module.add_parser(sub)
    return parser


def _quiet_imports() -> None:
    """Optional packages (torchao via diffusers) log CUDA-library and deprecation noise on import on
    CPU machines; it says nothing about the user's command. ZIMAGE_LORA_VERBOSE=1 keeps it."""
    import logging
    import os

    if os.environ.get("ZIMAGE_LORA_VERBOSE"):
        return
    for name in ("torchao", "torch.utils._pytree", "diffusers.quantizers", "diffusers.utils.import_utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*should be kept in float32.*")


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except LoRAError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
