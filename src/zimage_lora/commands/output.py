"""How commands write: rich tables for people, one JSON object for programs."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

import json
import os
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

#: Width given to rich when the output is not a terminal: long enough that no path or key is broken
#: (rich would otherwise wrap at 80 columns in a pipe); tables keep their natural width.
PIPE_WIDTH = 10_000


def console(stderr: bool = False, markup: bool = False) -> Console:
    """A rich Console: the terminal's width on a terminal; in a pipe or file, no wrapping at all
    (unless COLUMNS says otherwise)."""
    from rich.console import Console

    out = Console(stderr=stderr, markup=markup, highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(stderr=stderr, markup=markup, highlight=False, width=PIPE_WIDTH, soft_wrap=True)
    return out


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def emit_json(doc: Any) -> None:
    """One JSON object on stdout (dataclasses and paths made plain)."""
    json.dump(_plain(doc), sys.stdout, indent=1)
    sys.stdout.write("\n")
