"""The layout tables: how each trainer spells an adapter's keys, as data collected from the trainer
modules (`zimage_lora/trainers/`, one per trainer: its rows, prefixes and spellings).

A key is prefix + module name + role suffix. `Layout` rows say which prefix a trainer writes, how it
spells module names (dots or underscores, diffusers or native names, q/k/v split or fused) and the
suffix of every tensor role per algorithm family. The reader (`formats/grammar.py`) builds its
lookup tables from the same rows, plus the spellings files carry but no row writes.
"""

from __future__ import annotations

from ..trainers import (
    ADAPTER_NAMES,
    COMPANIONS,
    LAYOUTS,
    PREFIXES,
    READ_ONLY_SUFFIXES,
    TEXT_ENCODER_PREFIXES,
    TRAINER_DATA,
    UNSUPPORTED_FORMS,
    kohya,
    lycoris,
)
from ..trainers.base import Layout, Spelling
from ..trainers.spelling import (
    ALPHA,
    COMFY,
    DORA_SCALE,
    KOHYA,
    KOHYA_LORA,
    LOHA_ROLES,
    LOKR_ROLES,
    LYCORIS_ALGOS,
    LYCORIS_ONLY,
    PEFT,
    PEFT_LORA,
    PEFT_MAGNITUDE,
)

PEFT_ADAPTER_NAMES = ADAPTER_NAMES
UNSUPPORTED_SUFFIXES = {suffix: name for suffix, (name, _form) in UNSUPPORTED_FORMS.items()}
# kohya's (sd-scripts, musubi-tuner) and LyCORIS's text-encoder prefixes name the writer in inspect
# (formats/text_encoder.py).
KOHYA_TEXT_ENCODER_PREFIXES = kohya.TEXT_ENCODER_PREFIXES + lycoris.TRAINER.text_encoder_prefixes

__all__ = [
    "ALPHA", "COMFY", "COMPANIONS", "DORA_SCALE", "KOHYA", "KOHYA_LORA", "KOHYA_TEXT_ENCODER_PREFIXES", "LAYOUTS",
    "LOHA_ROLES", "LOKR_ROLES", "LYCORIS_ALGOS", "LYCORIS_ONLY", "Layout", "PEFT", "PEFT_ADAPTER_NAMES", "PEFT_LORA",
    "PEFT_MAGNITUDE", "PREFIXES", "READ_ONLY_SUFFIXES", "Spelling", "TEXT_ENCODER_PREFIXES", "TRAINER_DATA",
    "UNSUPPORTED_FORMS", "UNSUPPORTED_SUFFIXES",
]
