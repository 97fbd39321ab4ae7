"""diffusers (huggingface/diffusers): `save_lora_weights` under 'transformer.' with the PEFT config in
metadata 'lora_adapter_metadata' (possibly nested per component), and the attention-processor
spellings of its older LoRA (read only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..formats.untrusted import parse_json
from .base import Evidence, Label, Layout, Trainer
from .peft import PeftConfig
from .scale import ConfigSource
from .spelling import PEFT

if TYPE_CHECKING:
    from ..formats.safetensors_file import Header

PREFIX = "transformer."


def metadata_config(header: Header, component: str) -> PeftConfig | None:
    """diffusers' `lora_adapter_metadata` (PEFT-config JSON), possibly nested per component."""
    text = header.metadata.get("lora_adapter_metadata")
    if not text:
        return None
    doc = parse_json(text, header.path, what="metadata 'lora_adapter_metadata'", fix="Re-save the adapter.")
    # diffusers may nest per component: {"transformer": {...}} or prefix keys "transformer.r"
    if isinstance(doc, dict) and isinstance(doc.get(component), dict):
        doc = doc[component]
    if not isinstance(doc, dict):
        return None
    return PeftConfig(ConfigSource.DIFFUSERS_METADATA, {k.removeprefix(component + "."): v for k, v in doc.items()})


def _label(e: Evidence) -> str | None:
    return "diffusers" if PREFIX in e.prefixes else None


TRAINER = Trainer(
    name="diffusers",
    layouts=(Layout("diffusers", "diffusers save_lora_weights (alpha in lora_adapter_metadata)",
                    PREFIX, PEFT, alpha="metadata", metadata={"format": "pt"}),),
    prefixes={PREFIX: "diffusers", "unet.": "diffusers"},
    text_encoder_prefixes=("text_encoder.", "text_encoder_2."),
    # The old attention-processor LoRA (LoRALinearLayer) and its to_q_lora.down.weight spellings.
    read_only={"lora": {"down": (".lora_linear_layer.down.weight", "_lora.down.weight"),
                        "up": (".lora_linear_layer.up.weight", "_lora.up.weight")}},
    labels=(Label(82, _label),),
)
