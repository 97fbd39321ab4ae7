"""mflux (filipstrand/mflux): its Z-Image adapters are named by metadata alone, whatever prefix the
version wrote (without the metadata they read as ai-toolkit's keys)."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Evidence, Label, Trainer

MARKS = ("mflux_version",)  # ZImageTrainingAdapter.save_lora_adapter


def is_mflux(meta: Mapping[str, str]) -> bool:
    return any(k in meta for k in MARKS)


def _label(e: Evidence) -> str | None:
    return "mflux" if is_mflux(e.meta) else None


TRAINER = Trainer(name="mflux", labels=(Label(50, _label),))
