"""tdrussell/diffusion-pipe: models/z_image.py save_adapter writes PEFT's state dict under
'diffusion_model.' (ComfyUI's names), with metadata {'format': 'pt'} and nothing else."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Evidence, Label, Trainer


def is_diffusion_pipe(meta: Mapping[str, str]) -> bool:
    return dict(meta) == {"format": "pt"}


def _label(e: Evidence) -> str | None:
    if "comfy" in e.namings and is_diffusion_pipe(e.meta):
        return "diffusion-pipe (PEFT on ComfyUI's names" + (", fused qkv)" if e.fused else ")")
    return None


TRAINER = Trainer(name="diffusion-pipe", labels=(Label(71, _label),))
