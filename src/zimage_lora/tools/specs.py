"""`SOURCE[:SCALE]` arguments of the command line, as `LoRAConfiguration`s."""

from __future__ import annotations

from pathlib import Path

from ..errors import InvalidFormatError
from ..sources import PICKLE_SUFFIXES, LoRAConfiguration, parse_strength


def parse_lora_spec(text: str) -> LoRAConfiguration:
    """`style.safetensors:0.8`, `org/name:-0.5`, `./folder` -> source and scale (default 1).

    Only the text after the last ':' can be a scale, and not when it reads as part of a path (or the
    whole text is an existing path), so paths and hub ids with colons elsewhere still work. A scale
    that is not a finite number within float32's range ('abc', 'nan', '1e39') is refused by name.
    """
    if not text:
        raise InvalidFormatError("empty --lora value; expected SOURCE or SOURCE:SCALE, e.g. style.safetensors:0.8")
    source, sep, tail = text.rpartition(":")
    if not sep or not source or _exists(text) or not _is_strength_text(tail):
        return LoRAConfiguration(text)
    return LoRAConfiguration(source, parse_strength(tail, where=f"--lora {text!r}"))


def _is_strength_text(tail: str) -> bool:
    """What follows the last ':' is meant as a strength unless it reads as part of a path."""
    return bool(tail) and not any(c in tail for c in "/\\") and not tail.lower().endswith(_FILE_SUFFIXES)


_FILE_SUFFIXES = (".safetensors", ".json", *PICKLE_SUFFIXES)


def _exists(text: str) -> bool:
    try:
        return Path(text).exists()
    except OSError:  # e.g. a name too long for the file system: not a path, then
        return False
