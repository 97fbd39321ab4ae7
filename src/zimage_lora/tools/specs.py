"""`SOURCE[:SCALE]` arguments of the command line, as `LoRAConfiguration`s."""

from __future__ import annotations

from ..errors import InvalidFormatError
from ..sources import LoRAConfiguration


def parse_lora_spec(text: str) -> LoRAConfiguration:
    """`style.safetensors:0.8`, `org/name:-0.5`, `./folder` -> source and scale (default 1).

    Only a trailing `:number` is a scale, so paths and hub ids with colons elsewhere still work.
    """
    if not text:
        raise InvalidFormatError("empty --lora value; expected SOURCE or SOURCE:SCALE, e.g. style.safetensors:0.8")
    source, sep, tail = text.rpartition(":")
    if sep and source:
        try:
            return LoRAConfiguration(source, float(tail))
        except ValueError:
            pass
    return LoRAConfiguration(text)
