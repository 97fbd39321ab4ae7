"""OneTrainer (Nerogar/OneTrainer): three savers for Z-Image LoRA (legacy, original, ComfyUI), its
metadata marks, and the scaled-OFT marker of its OFT_2 (read by `algorithms/oft_input.py`)."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Evidence, Label, Layout, Trainer
from .diffusers import PREFIX as DIFFUSERS_PREFIX
from .spelling import ALPHA, DORA_SCALE, KOHYA_DOWN, KOHYA_LORA, PEFT_LORA

MARKS = ("ot_revision", "ot_branch")  # DtypeModelSaverMixin._create_safetensors_header


def is_onetrainer(meta: Mapping[str, str]) -> bool:
    return any(k in meta for k in MARKS)


def _kohya(e: Evidence) -> str | None:
    return "onetrainer (kohya)" if "kohya" in e.namings and is_onetrainer(e.meta) else None


def _comfy(e: Evidence) -> str | None:
    return "onetrainer (comfy)" if "comfy" in e.namings and is_onetrainer(e.meta) else None


def _comfy_alpha(e: Evidence) -> str | None:
    # lora_A/lora_B with a per-module alpha on diffusers names: OneTrainer's COMFY output.
    if "comfy" in e.namings and e.alphas:
        return "comfyui keys with lora_A/lora_B + alpha (OneTrainer's COMFY output writes these; no metadata names it)"
    return None


def _diffusers(e: Evidence) -> str | None:
    if DIFFUSERS_PREFIX not in e.prefixes:
        return None
    if is_onetrainer(e.meta):
        return "onetrainer (legacy)" if KOHYA_DOWN in e.roles else "onetrainer (diffusers)"
    return "onetrainer (legacy)" if KOHYA_DOWN in e.roles else None


def _original(e: Evidence) -> str | None:
    return "onetrainer (original)" if is_onetrainer(e.meta) else None


def _bare_alpha(e: Evidence) -> str | None:
    return "onetrainer" if e.alphas else None


TRAINER = Trainer(
    name="onetrainer",
    layouts=(
        Layout("onetrainer-legacy", "OneTrainer ZImageLoRASaver._convert_legacy",
               DIFFUSERS_PREFIX, {"lora": KOHYA_LORA, "scale": ALPHA}),
        Layout("onetrainer-original", "OneTrainer LoRASaverMixin._save_original",
               "", {"lora": PEFT_LORA, "scale": ALPHA}),
        Layout("onetrainer-comfy", "OneTrainer LoRASaverMixin._save_comfy",
               "diffusion_model.", {"lora": PEFT_LORA, "scale": ALPHA, "dora": DORA_SCALE}),
    ),
    # OFT_2's scaled-OFT marker buffer (algorithms/oft_input.py); read only, no row writes it.
    read_only={"oft_r": {"scaled": (".oft_R.scaled_oft",)}},
    labels=(Label(31, _kohya), Label(70, _comfy), Label(76, _comfy_alpha), Label(80, _diffusers),
            Label(100, _original), Label(120, _bare_alpha)),
)
