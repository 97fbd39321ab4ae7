"""LyCORIS (KohakuBlueleaf/LyCORIS): LycorisNetwork's 'lycoris_' keys, the algorithms only it writes
(GLoRA, diag-OFT, BOFT, IA3: `spelling.LYCORIS_ONLY`), and the metadata that names it (its network
module), which also sets its OFT bound (`comfyui.oft_constraint`)."""

from __future__ import annotations

from collections.abc import Mapping

from .base import Evidence, Label, Layout, Trainer
from .spelling import KOHYA

PREFIX = "lycoris_"


def names_lycoris(meta: Mapping[str, str]) -> bool:
    """LyCORIS's own network module in the metadata (kohya's `ss_network_module`)."""
    return "lycoris" in meta.get("ss_network_module", "")


def _prefix(e: Evidence) -> str | None:
    return "lycoris" if PREFIX in e.prefixes else None


def _bare(e: Evidence) -> str | None:
    return "bare module names (lycoris)" if e.algorithms & {"lokr", "loha"} else None


TRAINER = Trainer(
    name="lycoris",
    layouts=(Layout("lycoris", "LyCORIS LycorisNetwork (prefix 'lycoris')", PREFIX, KOHYA, flat=True,
                    metadata={"ss_network_module": "lycoris.kohya"}),),
    prefixes={PREFIX: "lycoris"},
    text_encoder_prefixes=("lycoris_te_",),
    # (family, role) -> a role of the same family it needs beside it: a suffix as short as '.weight' would
    # match any module weight, so it counts only where its companion sits on the same module; alone it is
    # reported as a key without an adapter suffix (formats/reader.py). IA3: `.weight` + `.on_input`.
    companions={("ia3", "weight"): "on_input"},
    labels=(Label(20, _prefix), Label(110, _bare)),
)
