"""`zimage-lora bench`: runs the repository's bench/run.py (us and the peers side by side).

The bench lives in the source checkout, not in the installed package: it needs the peers (PEFT, LyCORIS,
diffusers) and writes results next to itself.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from ..errors import LoRAError

SUMMARY = "performance bench against PEFT, diffusers and LyCORIS (source checkout only)"


def _script() -> Path:
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        candidate = root / "bench" / "run.py"
        if candidate.is_file():
            return candidate
    raise LoRAError(
        "bench/run.py not found: the bench ships with the source checkout. Run `zimage-lora bench` from the "
        "repository root (git clone, then pip install -e .[test])."
    )


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help=SUMMARY,
        description="Pass-through to bench/run.py, e.g. `zimage-lora bench all --quick`, "
        "`zimage-lora bench lora --dtypes fp32 --tokens 1024`; `zimage-lora bench help` lists its options.",
    )
    p.add_argument("what", help="all, lora, lokr, merge, switch, load, compile, checkpoint, or help")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options for bench/run.py")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    script = _script()
    argv = ["-h"] if args.what == "help" else [args.what, *args.bench_args]
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = saved
    return 0
