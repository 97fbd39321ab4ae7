"""What files carry that no one trainer this library knows owns: spellings read (never written),
text-encoder prefixes of several writers, and forms of no known trainer."""

from __future__ import annotations

from .base import Trainer

TRAINER = Trainer(
    name="other",
    # Trainers that drop '.weight' from the LoRA keys, and a PEFT-style per-module alpha.
    read_only={
        "lora": {"down": (".lora_A", ".lora_down"), "up": (".lora_B", ".lora_up"), "mid": (".lora_mid",)},
        "scale": {"alpha": (".lora_alpha",)},
    },
    text_encoder_prefixes=("te.", "te1.", "te2.", "cond_stage_model.", "conditioner.",
                           "text_model.", "qwen3.", "lora_qwen"),
    unsupported={".oft_diag": ("OFT", "OFT in the 'oft_diag' form (a spelling of no trainer this library knows)")},
)
