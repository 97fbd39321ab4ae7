"""ostris/ai-toolkit: LoRA under ComfyUI's 'diffusion_model.' names without alpha, and its LyCORIS
port (toolkit/models/lokr.py, alpha kept), named by its 'software' metadata."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Evidence, Label, Layout, Trainer
from .spelling import ALPHA, LYCORIS_ALGOS, PEFT_LORA

_SOFTWARE = '"ai-toolkit"'  # ToolkitNetworkMixin.save_weights: metadata 'software' = {"name": "ai-toolkit", ...}


def is_ai_toolkit(meta: Mapping[str, str]) -> bool:
    return _SOFTWARE in meta.get("software", "")


def _lycoris(e: Evidence) -> str | None:
    if "comfy" in e.namings and e.algorithms & {"lokr", "loha"} and is_ai_toolkit(e.meta):
        return "ai-toolkit (lycoris)"
    return None


def _lora(e: Evidence) -> str | None:
    # ai-toolkit (and mflux without its metadata) write diffusion_model. + lora_A/lora_B, no alpha.
    return "ai-toolkit" if "comfy" in e.namings else None


TRAINER = Trainer(
    name="ai-toolkit",
    layouts=(
        Layout("ai-toolkit", "ostris/ai-toolkit ToolkitNetworkMixin.save_weights (LoRA: no alpha)",
               "diffusion_model.", {"lora": PEFT_LORA}, alpha="none"),
        Layout("ai-toolkit-lycoris", "ai-toolkit toolkit/models/lokr.py (LyCORIS port: alpha kept)",
               "diffusion_model.", {**LYCORIS_ALGOS, "scale": ALPHA}, metadata={"software": '{"name": "ai-toolkit"}'}),
    ),
    labels=(Label(72, _lycoris), Label(77, _lora)),
)
