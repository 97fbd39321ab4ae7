"""The scale vocabulary every trainer's rule speaks: where an alpha came from (`AlphaFrom`), the
`Scale` of one module, and the two checks every rule applies to a file's alpha.

Typed, so that the numbers and the notes `inspect` prints depend only on the types: a message can be
reworded without changing a scale. `Scale.rule` is display text only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from ..errors import InvalidFormatError
from ..fp32 import fits_fp32

if TYPE_CHECKING:
    from ..formats.reader import AdapterFile, Group
    from .musubi import MusubiLoKr


class ConfigSource(Enum):
    """Where a PEFT-style config (lora_alpha, alpha_pattern, use_rslora, OFT options) came from."""

    PEFT_CONFIG = "adapter_config.json"
    DIFFUSERS_METADATA = "metadata 'lora_adapter_metadata'"


class AlphaFrom(Enum):
    """Where the alpha that sets a scale came from (the value is how messages name it)."""

    KEY = ".alpha key"  # a per-module alpha tensor
    NONE = "none"  # no alpha (or alpha 0): scale 1
    UNUSED = "unused"  # the file has one, the algorithm's scale rule never reads it
    KOHYA_METADATA = "metadata 'ss_network_alpha'"
    DIFFUSERS_METADATA = ConfigSource.DIFFUSERS_METADATA.value
    PEFT_CONFIG = ConfigSource.PEFT_CONFIG.value

    @property
    def from_config(self) -> bool:
        """A file-wide value (metadata or config), not the module's own alpha."""
        return self in (AlphaFrom.KOHYA_METADATA, AlphaFrom.DIFFUSERS_METADATA, AlphaFrom.PEFT_CONFIG)


@dataclass(frozen=True)
class Scale:
    rank: int | None
    scale: float
    alpha: float | None  # the file's alpha for this module (config/metadata alpha where that applies)
    rule: str  # how `scale` was derived, for display only, e.g. "alpha/rank (.alpha key)"
    source: AlphaFrom = AlphaFrom.KEY
    ignored_metadata: AlphaFrom | None = None  # a metadata/config alpha that exists but does not describe this module
    trainer: MusubiLoKr | None = None  # a trainer's own rule that set the scale

    @property
    def alpha_used(self) -> bool:
        return self.alpha is not None and self.source is not AlphaFrom.UNUSED


def finite_key_alpha(file: AdapterFile, group: Group) -> float:
    alpha = group.alpha
    if alpha is None or not math.isfinite(alpha):
        raise InvalidFormatError(
            f"{file.path}: alpha '{group.alpha_key}' is {alpha}; expected a finite number. It sets the scale of "
            f"module '{group.stem}' ({group.algorithm}): fix the alpha in the file."
        )
    return alpha


def check_scale(file: AdapterFile, group: Group, alpha: float, rank: int, scale: float) -> None:
    # Deltas are built in fp32: a scale beyond its range overflows there (found by fuzzing: alpha 1.4e39).
    if not fits_fp32(scale):
        raise InvalidFormatError(
            f"{file.path}: module '{group.stem}': alpha {alpha} / rank {rank} gives scale {scale:g}, beyond the "
            "float32 range. The alpha is corrupt: fix it in the file or its config."
        )
