"""The module index of a text encoder: `ModuleIndex` over its `named_modules()`, plus the one naming
difference files carry between Hugging Face's two Qwen3 classes.

`Qwen3ForCausalLM` names its layers `model.layers.N...` and `Qwen3Model` (what Z-Image pipelines load)
names them `layers.N...`; trainers save whichever they held, so a stem is tried as written, then
without a leading `model.` (or `model_` when underscore-flattened), then with one added.
"""

from __future__ import annotations

from .index import ModuleIndex, Site


def _candidates(stem: str) -> list[str]:
    out = [stem]
    for lead in ("model.", "model_"):
        if stem.startswith(lead) and len(stem) > len(lead):
            out.append(stem[len(lead):])
            return out
    out += ["model." + stem, "model_" + stem]
    return out


class TextEncoderIndex(ModuleIndex):
    """Every adaptable module of a text encoder, under every spelling a file may use."""

    def lookup(self, stem: str) -> Site | None:
        for candidate in _candidates(stem):
            site = super().lookup(candidate)
            if site is not None:
                return site
        return None
