"""`convert --to` targets, named by the applications that load them.

Each target is a layout row of `layouts/tables.py` to write with, the loader whose key rules the
written keys must pass (`tools/loaders.py`), and the applications it is for (shown by `--help` and
the README). Where ComfyUI computes a written algorithm differently from the trainers, the
difference is said here once (`comfyui_differences`), for convert's warnings and inspect's notes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .. import algorithms
from ..adapter import Dora
from ..errors import LoRAError
from ..layouts.item import Item


@dataclass(frozen=True)
class ConvertTarget:
    name: str
    layout: str  # the row of layouts.tables.LAYOUTS it writes
    loader: str  # the key rules of tools.loaders.LOADERS every written key must pass
    apps: str  # who loads it, for --help and the README
    spelling: str  # what the keys look like
    families: tuple[str, ...] | None = None  # algorithm families it may hold (None: what the layout spells)
    lycoris_layout: str | None = None  # the row for LoKr / LoHa / diffs where `layout` holds LoRA only
    fix: str = "Convert to 'kohya', which keeps every module."  # when its loader would skip a module


# What ComfyUI's weight adapters apply as the trainers do (comfy/weight_adapter/ at 3cd7b32):
# LoRA, LoKr, LoHa and diffs. GLoRA, OFT, BOFT and IA3 are refused or warned about below.
COMFYUI_FAMILIES = ("lora", "lokr", "loha", "full")

TARGETS: dict[str, ConvertTarget] = {t.name: t for t in (
    ConvertTarget("comfyui", "comfy", "comfyui", "ComfyUI (LoraLoader) and front ends that run on it (SwarmUI)",
                  "diffusion_model.<native module>, q/k/v fused into attention.qkv, + .alpha",
                  families=COMFYUI_FAMILIES),
    ConvertTarget("kohya-comfyui", "kohya-fused", "comfyui",
                  "ComfyUI, SwarmUI and Forge (kohya keys on ComfyUI's native module names)",
                  "lora_unet_<native module, '_' for '.'>, q/k/v fused into attention_qkv, + .alpha",
                  families=COMFYUI_FAMILIES,
                  # ComfyUI knows split q/k/v only by diffusers names, which its kohya spelling lacks.
                  fix="Convert to 'comfyui', whose diffusion_model. keys can name q, k and v apart "
                      "(a LoKr, LoHa or per-input DoRA on q/k/v cannot be fused exactly)."),
    ConvertTarget("musubi", "kohya", "kohya",
                  "musubi-tuner (--lora_weight), diffusers load_lora_weights (LoRA), LyCORIS (every algorithm)",
                  "lora_unet_<diffusers module, '_' for '.'> + lora_down/lora_up + .alpha; LyCORIS suffixes"),
    ConvertTarget("diffusers", "diffusers", "diffusers", "diffusers ZImagePipeline.load_lora_weights",
                  "transformer.<module>.lora_A/lora_B, alpha in lora_adapter_metadata (LoRA, DoRA)"),
    ConvertTarget("peft", "peft", "peft", "PEFT PeftModel.from_pretrained on the diffusers transformer",
                  "a folder: adapter_model.safetensors + adapter_config.json (LoRA, DoRA)"),
    ConvertTarget("ai-toolkit", "ai-toolkit", "ai-toolkit", "ai-toolkit (its own Z-Image file naming)",
                  "diffusion_model.<diffusers module>.lora_A/lora_B, scale folded in; LoKr/LoHa/diffs "
                  "with LyCORIS suffixes + .alpha", lycoris_layout="ai-toolkit-lycoris"),
)}

#: Other names accepted for a target (shown in --help): the names earlier versions used.
ALIASES = {"comfy": "comfyui", "kohya": "musubi"}

#: `--to` choices, targets first, then aliases.
NAMES = (*TARGETS, *ALIASES)


def get(name: str) -> ConvertTarget:
    key = ALIASES.get(name, name)
    if key not in TARGETS:
        raise LoRAError(f"unknown target layout {name!r}; choose one of {', '.join(NAMES)}.")
    return TARGETS[key]


def layout_for(target: ConvertTarget, items: list[Item]) -> str:
    """The layout row to write `items` with: the LyCORIS row when the LoRA-only row cannot hold them."""
    if target.lycoris_layout and any(algorithms.get(i.algorithm).family != "lora" for i in items):
        return target.lycoris_layout
    return target.layout


# -- where ComfyUI computes differently (checked against comfy/weight_adapter/ at 3cd7b32) ---------------

#: Refused for ComfyUI targets, with the reason (family -> why).
COMFYUI_REFUSED = {
    "ia3": "ComfyUI has no IA3 adapter (comfy/weight_adapter/ holds LoRA, LoHa, LoKr, GLoRA, OFT, BOFT): "
           "it would skip every key",
    "glora": "ComfyUI reads GLoRA's factors by another rule than LyCORIS writes them",
    "oft": "ComfyUI bounds an OFT rotation by alpha where LyCORIS bounds it by alpha x out_features",
}


def comfyui_differences(parts: Iterable[tuple[str, str, Dora | None]]) -> list[str]:
    """One line per way ComfyUI would apply an adapter differently from the trainers (PEFT, LyCORIS);
    `parts` is (module, algorithm, DoRA or None) per module."""
    parts = list(parts)
    out = []
    dora_out = [name for name, _, dora in parts if dora is not None and dora.on_out]
    if dora_out:
        out.append(
            f"DoRA with a magnitude per output row on {len(dora_out)} module(s) (e.g. {dora_out[0]}): ComfyUI "
            "divides by the base weight's row norms ||W||, PEFT and LyCORIS by ||W + dW||, so each output row "
            "differs by the factor ||W + dW|| / ||W||, also at strength 1 (it depends on the base weights)."
        )
    algos = {algorithm for _, algorithm, _ in parts}
    if "oft" in algos:
        out.append(
            "OFT: ComfyUI scales both the rotation and its result by the strength, so strength s acts as "
            "s^2 (the same at strength 1; at 0.5 ComfyUI applies a quarter of the change, not half)."
        )
    if "boft" in algos:
        out.append(
            "BOFT: ComfyUI moves each butterfly stage toward the identity by the strength and then scales "
            "the change by it again (LyCORIS does the first only, this library is linear in the strength): "
            "the same at strength 1 only."
        )
    return out


def comfyui_refusal(family: str) -> str | None:
    return COMFYUI_REFUSED.get(family)


def help_table() -> str:
    """The --help lines: each target, its keys and who loads it."""
    lines = []
    for t in TARGETS.values():
        lines.append(f"  {t.name:<14}{t.spelling}")
        lines.append(f"  {'':<14}loaded by: {t.apps}")
    lines.append("  aliases: " + ", ".join(f"{a} = {b}" for a, b in ALIASES.items()))
    return "\n".join(lines)
