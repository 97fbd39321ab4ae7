"""The `zimage-lora` command line. Each subcommand lives in `commands/<name>.py` with
`add_parser(subparsers)`, `run(args) -> int` and a one-line `SUMMARY`; this file only wires them together.

Start-up is kept light: only the chosen command's parser is built in full (a parser may import
torch for its choices), the others are listed by their `SUMMARY`; `zimage-lora --help` imports
neither torch nor diffusers.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from types import ModuleType
from typing import NoReturn

from .errors import LoRAError

COMMANDS = ("inspect", "merge", "convert", "generate", "demo", "bench", "serve", "completion",
            "combine", "resize", "extract")

EPILOG = """examples:
  zimage-lora demo
  zimage-lora inspect my_style.safetensors
  zimage-lora inspect org/some-zimage-lora --json
  zimage-lora merge --model ./Z-Image-Turbo/transformer --lora style.safetensors:0.8 --out merged/
  zimage-lora convert style.safetensors --to diffusers --out style_diffusers.safetensors
  zimage-lora generate --prompt "a lighthouse at dusk" --lora style.safetensors:0.9 --out lighthouse.png
  eval "$(zimage-lora completion bash)"     # tab completion for this shell
"""

VERBOSE_HELP = "show third-party log lines and warnings (hidden by default)"

# Library messages name the Python spelling of a fix; on the command line the flag is the fix.
CLI_SPELLINGS = (
    (re.compile(r"Pass strict=False to apply the matched part\."), "Run without --strict to apply the matched part."),
    (re.compile(r"\bstrict=True\b"), "--strict"),
    (re.compile(r"filename=\.\.\. \(CLI: SOURCE --filename NAME, or pass the file path itself\)"),
     "--filename NAME (or pass the file path itself)"),
    (re.compile(r"mode='dynamic'"), "--mode dynamic"),
    (re.compile(r"mode='merged'"), "--mode merged"),
)


class UsageError(LoRAError):
    """A command line argparse refuses (missing or unknown option, bad choice)."""


class _Parser(argparse.ArgumentParser):
    """argparse with the README's promise: one `error:` line and exit status 1 (argparse alone prints
    the usage and exits 2). Subcommand parsers are made of the same class."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}. See '{self.prog} --help'.")


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f".commands.{name}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.commands.{name}":
            return None  # command not part of this build
        raise


def build_parser(only: str | None = None, *, full: bool = True) -> argparse.ArgumentParser:
    """The parser; with `full=False` only the command `only` gets its options (the rest: name and help)."""
    parser = _Parser(
        prog="zimage-lora",
        description="LoRA, LoKr, LoHa, DoRA and full-diff adapters for the Z-Image transformer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("-V", "--version", action="version", version=f"zimage-lora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = _module(name)
        if module is None:
            continue
        if not full and name != only and hasattr(module, "SUMMARY"):
            sub.add_parser(name, help=module.SUMMARY, add_help=False)
            continue
        module.add_parser(sub)
        # after the command too (`zimage-lora inspect x --verbose`); SUPPRESS keeps a global -v
        sub.choices[name].add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
        )
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The command word in argv (the first word that is not an option), if it names a command."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def cli_message(text: str) -> str:
    for pattern, replacement in CLI_SPELLINGS:
        text = pattern.sub(replacement, text)
    return text


def main(argv: list[str] | None = None) -> int:
    from .quiet import SHOW_ALL, hide_third_party, verbose_env

    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = verbose_env() or any(a in ("-v", "--verbose") for a in argv)
    token = SHOW_ALL.set(verbose)
    try:
        with hide_third_party(enabled=not verbose):
            parser = build_parser(_chosen(argv), full=False)
            args = parser.parse_args(argv)
            if not getattr(args, "command", None):
                parser.print_help()
                return 2
            return int(args.run(args) or 0)
    except LoRAError as exc:
        print(f"error: {cli_message(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `zimage-lora inspect x | head`: the reader left; no traceback at exit
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        SHOW_ALL.reset(token)


if __name__ == "__main__":
    sys.exit(main())
