"""DiffSynth-Studio: PEFT's state dict without the pipeline prefix, the adapter name kept in the key
('.lora_A.default.weight'), no alpha."""

from __future__ import annotations

from .base import Evidence, Label, Layout, Trainer
from .spelling import PEFT_LORA


def _label(e: Evidence) -> str | None:
    hit = any(".default." in k or k.endswith(".default") for k in e.tensor_keys)
    return "diffsynth" if hit else None


TRAINER = Trainer(
    name="diffsynth",
    layouts=(Layout("diffsynth", "DiffSynth-Studio (PEFT state dict without the pipeline prefix)",
                    "", {"lora": PEFT_LORA}, alpha="none", adapter_name="default"),),
    labels=(Label(90, _label),),
)
