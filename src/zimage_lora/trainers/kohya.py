"""kohya-ss sd-scripts and its network copies (musubi-tuner's LoRANetwork, VideoX-Fun's): 'lora_unet_'
keys with module dots as underscores, a `.alpha` per module, or one alpha for the whole file in
metadata 'ss_network_alpha'. musubi-tuner's own rules (its LoKr, its converters) are in `musubi.py`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import InvalidFormatError
from .base import ConfigAlpha, Evidence, Label, Layout, Note, Trainer
from .scale import AlphaFrom, Scale
from .spelling import ALPHA, KOHYA

if TYPE_CHECKING:
    from ..formats.reader import AdapterFile, Group
    from ..formats.safetensors_file import Header

DOTTED_LORA = {"down": ".lora.down.weight", "up": ".lora.up.weight", "mid": ".lora.mid.weight"}  # Anime-Z (F11)
VIDEOX_PREFIX = "lora_unet__"  # VideoX-Fun: "lora_unet" + "." + "" + "." + module, then '.' -> '_'
# The reader strips the first prefix that matches: a prefix comes before any shorter one it starts with.
PREFIXES = {VIDEOX_PREFIX: "kohya", "lora_unet_": "kohya", "lora_transformer_": "kohya"}
KOHYA_PREFIXES = tuple(PREFIXES)
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")


def has_kohya_metadata(meta: Mapping[str, str]) -> bool:
    return any(k.startswith("ss_network_") for k in meta)


def network_alpha(header: Header) -> float | None:
    """Metadata 'ss_network_alpha': one alpha for every module without its own `.alpha`."""
    raw = header.metadata.get("ss_network_alpha")
    if raw is None:
        return None
    try:
        alpha = float(raw)
    except ValueError:
        return None
    if not math.isfinite(alpha):
        raise InvalidFormatError(
            f"{header.path}: metadata 'ss_network_alpha' is {raw!r}; expected a finite "
            "number. Fix the metadata or add per-module '.alpha' tensors."
        )
    return alpha


def _config_alpha(file: AdapterFile, group: Group) -> ConfigAlpha | None:
    alpha = file.meta.kohya_alpha
    if alpha is None:
        return None
    # kohya's ss_network_alpha means alpha only for kohya-style keys without a per-module .alpha;
    # converters that bake alpha into the weights (musubi-tuner convert_lora.py --target other) copy
    # the source file's metadata, and applying it there would scale the file a second time.
    if group.prefix not in KOHYA_PREFIXES:
        return ConfigAlpha(None, AlphaFrom.NONE, ignored=AlphaFrom.KOHYA_METADATA)
    return ConfigAlpha(alpha, AlphaFrom.KOHYA_METADATA)


def _ignored_notes(file: AdapterFile, scales: list[tuple[Group, Scale]]) -> list[str]:
    ignored = [g for g, s in scales if s.ignored_metadata is AlphaFrom.KOHYA_METADATA]
    if not ignored:
        return []
    value = file.header.metadata.get("ss_network_alpha", "?")
    return [
        f"metadata 'ss_network_alpha' = {value} was not applied to {len(ignored)} module(s) (e.g. "
        f"'{ignored[0].source_keys[0]}'): their keys are not kohya-style, so it does not describe them "
        "(musubi-tuner convert_lora.py --target other bakes alpha into lora_A/lora_B and copies this metadata)"
    ]


def _videox(e: Evidence) -> str | None:
    # VideoX-Fun lora_utils.LoRANetwork: "lora_unet" + "." + "" + "." + module, dots -> '_'.
    return "videox-fun (kohya keys, lora_unet__)" if "kohya" in e.namings and VIDEOX_PREFIX in e.prefixes else None


def _kohya(e: Evidence) -> str | None:
    if "kohya" not in e.namings:
        return None
    return "kohya (fused qkv)" if e.fused else "kohya"


TRAINER = Trainer(
    name="kohya",
    layouts=(
        Layout("kohya", "kohya-ss sd-scripts / musubi-tuner networks/lora_zimage.py (LoRANetwork, 'lora_unet')",
               "lora_unet_", KOHYA, flat=True),
        Layout("kohya-dotted", "Anime-Z style files (F11): kohya names, '.lora.down.weight'",
               "lora_unet_", {"lora": DOTTED_LORA, "scale": ALPHA}, flat=True),
        Layout("videox-fun", "VideoX-Fun videox_fun/utils/lora_utils.py LoRANetwork ('lora_unet' + '.' + '')",
               VIDEOX_PREFIX, KOHYA, flat=True),
    ),
    prefixes=PREFIXES,
    text_encoder_prefixes=TEXT_ENCODER_PREFIXES,
    labels=(Label(30, _videox), Label(33, _kohya)),
    config_alpha=_config_alpha,
    notes=(Note(20, _ignored_notes),),
)
