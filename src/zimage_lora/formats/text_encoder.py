"""Text-encoder keys: which keys are the text encoder's and what module stem each one names.

Z-Image's text encoder is Qwen3 (`pipe.text_encoder`). Files spell its keys three ways:

- kohya / musubi-tuner: `lora_te_<module name with underscores>` (`lora_te_layers_0_self_attn_q_proj`);
- ComfyUI: `text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj` (the text-encoder
  slot name, then ComfyUI's `transformer.` wrapper around the Hugging Face model);
- diffusers / PEFT: `text_encoder.layers.0.self_attn.q_proj`.

The stem left after the prefix is resolved against the text encoder's own `named_modules()`, where
`model.` may or may not lead (Qwen3ForCausalLM vs Qwen3Model): see `keys/text_encoder.py`.
"""

from __future__ import annotations

import re

from ..layouts.tables import KOHYA_TEXT_ENCODER_PREFIXES
from . import grammar

#: Reported for text-encoder keys when only a transformer was given.
TRANSFORMER_ONLY_REASON = (
    "text-encoder key: only the transformer was given; pass the pipeline (with its text_encoder) to apply it "
    "(command line: `zimage-lora generate` applies it; `inspect` and `merge` read the transformer only)"
)

# ComfyUI names each text encoder `text_encoders.<slot>.` and wraps the Hugging Face model in
# `.transformer.` (its `qwen3_4b.transformer.model.layers...` state dict).
_COMFY_SLOT = re.compile(r"^text_encoders\.[A-Za-z0-9_]+\.(transformer\.)?")


def is_text_encoder(key: str) -> bool:
    return grammar.is_text_encoder(key)


def strip_prefix(stem: str) -> tuple[str, str]:
    """(prefix, rest) of a text-encoder stem; the longest known prefix is removed once."""
    match = _COMFY_SLOT.match(stem)
    if match and len(stem) > match.end():
        return match.group(0), stem[match.end():]
    for prefix in sorted(grammar.TEXT_ENCODER_PREFIXES, key=len, reverse=True):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return prefix, stem[len(prefix):]
    return "", stem


def parse_key(key: str) -> grammar.ParsedKey | None:
    """Like `grammar.parse_key`, for a text-encoder key: the same role suffixes, text-encoder prefixes."""
    split = grammar.split_role(key)
    if split is None:
        return None
    stem, family, role = split
    prefix, rest = strip_prefix(stem)
    return grammar.ParsedKey(key=key, prefix=prefix, stem=rest, family=family, role=role)


def format_label(prefixes: set[str]) -> str:
    """The writer a text-encoder part's prefixes point to."""
    if any(p.startswith("text_encoders.") for p in prefixes):
        return "comfyui (text encoder)"
    if any(p.startswith(KOHYA_TEXT_ENCODER_PREFIXES) for p in prefixes):
        return "kohya (text encoder)"
    if "text_encoder." in prefixes:
        return "diffusers (text encoder)"
    return "text encoder"
