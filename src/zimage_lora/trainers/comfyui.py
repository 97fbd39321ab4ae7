"""ComfyUI (pollockjj/ComfyUI 3cd7b32): its native names under 'diffusion_model.' (q/k/v fused,
to_out.0 as 'out'), its loader's OFT/BOFT constraint, and the labels of files on its names."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import TYPE_CHECKING

from .. import algorithms
from .ai_toolkit import is_ai_toolkit
from .base import Evidence, Label, Layout, Note, Trainer
from .lycoris import names_lycoris
from .spelling import COMFY, KOHYA_DOWN

if TYPE_CHECKING:
    from ..formats.reader import AdapterFile, Group
    from .scale import Scale


class OFTConstraint(Enum):
    """The norm bound on OFT's/BOFT's skew blocks Q that a file's `.alpha` means.

    LYCORIS: ||Q||_F <= alpha * out (DiagOFTModule / ButterflyOFTModule.__init__).
    COMFYUI: ||Q||_F <= alpha (comfy/weight_adapter/oft.py and boft.py at 3cd7b32: `constraint = alpha`,
    and its train node saves alpha 1.0).
    """

    LYCORIS = "lycoris"
    COMFYUI = "comfyui"


def oft_constraint(meta: Mapping[str, str], comfy_native: bool) -> OFTConstraint:
    """ComfyUI's bound for files on its own names, unless the metadata names a LyCORIS-based trainer
    (LyCORIS's network module, or ai-toolkit, whose toolkit/models are LyCORIS ports)."""
    lycoris = names_lycoris(meta) or is_ai_toolkit(meta)
    return OFTConstraint.COMFYUI if comfy_native and not lycoris else OFTConstraint.LYCORIS


def _constraint_notes(file: AdapterFile, scales: list[tuple[Group, Scale]]) -> list[str]:
    """OFT/BOFT modules read with ComfyUI's constraint (`OFTConstraint.COMFYUI`), and where LyCORIS differs."""
    mine = [g for g, _s in scales if algorithms.get(g.algorithm).absolute_alpha_role in g.keys]
    if not mine:
        return []
    role = algorithms.get(mine[0].algorithm).absolute_alpha_role
    assert role is not None  # `mine` holds only groups with one
    bounds = [(float(v.float().reshape(-1)[0]), tuple(g.shapes.get("oft_blocks", ())))
              for g in mine for v in file.load([g.keys[role]]).values()]
    # alpha <= 0 bounds nothing under either rule (convert writes ComfyUI's OFT so): no difference to note.
    bounds = [(a, shape) for a, shape in bounds if a > 0]
    if not bounds:
        return []
    shown = ", ".join(f"{a:g}" for a in sorted({a for a, _s in bounds})[:5])
    lycoris = sorted({a * shape[-3] * shape[-1] for a, shape in bounds if len(shape) >= 3})
    titles = sorted({algorithms.get(g.algorithm).title for g in mine})
    return [
        f"{len(bounds)} {'/'.join(titles)} module(s) follow ComfyUI's constraint, ||Q||_F <= alpha (here {shown}; "
        f"comfy/weight_adapter/oft.py and boft.py): the file is ComfyUI-native ({file.meta.oft_constraint.value} "
        "rule: diffusion_model. keys, no LyCORIS metadata). LyCORIS bounds ||Q||_F by alpha * out "
        f"({', '.join(f'{v:g}' for v in lycoris[:5])}), so it applies a larger rotation wherever a module's blocks "
        f"exceed {shown}"
    ]


def _lycoris_factors(e: Evidence) -> str | None:
    if "comfy" in e.namings and e.algorithms & {"lokr", "loha"}:
        return ("unknown writer (LyCORIS factors under ComfyUI's 'diffusion_model.' names, no metadata naming "
                "the writer; ai-toolkit, diffusion-pipe and musubi-tuner's converter write these keys)")
    return None


def _native(e: Evidence) -> str | None:
    if "comfy" in e.namings and e.fused:
        return "comfyui-native (fused qkv: ComfyUI training/extract nodes, Civitai)"
    return None


def _kohya_roles(e: Evidence) -> str | None:
    return "comfyui" if "comfy" in e.namings and KOHYA_DOWN in e.roles else None


TRAINER = Trainer(
    name="comfyui",
    layouts=(Layout("comfy", "ComfyUI native names, fused qkv (training / extract nodes, Civitai F9)",
                    "diffusion_model.", COMFY, native=True, fused_qkv=True),),
    # A full ComfyUI checkpoint's state-dict names, and the adapter's.
    prefixes={"model.diffusion_model.": "comfy", "diffusion_model.": "comfy"},
    # ComfyUI names each text encoder `text_encoders.<slot>.` (formats/text_encoder.py).
    text_encoder_prefixes=("text_encoders.",),
    labels=(Label(73, _lycoris_factors), Label(74, _native), Label(75, _kohya_roles)),
    notes=(Note(70, _constraint_notes),),
)
