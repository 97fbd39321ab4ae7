"""`convert --to` targets, named by the applications that load them.

Each target is a layout row of `layouts/tables.py` to write with, the loader whose key rules the
written keys must pass (`tools/loaders.py`), and the applications it is for (shown by `--help` and
the README). Where ComfyUI computes a written algorithm differently from the trainers, the
difference is said here once (`comfyui_differences`), for convert's warnings and inspect's notes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch

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


# What ComfyUI's weight adapters apply (comfy/weight_adapter/ at 3cd7b32): LoRA, LoKr, LoHa and diffs as
# the trainers do; LyCORIS's OFT and BOFT with the differences `comfyui_differences` measures. GLoRA,
# IA3 and PEFT's input-rotation OFT/BOFT are refused (`COMFYUI_REFUSED`).
COMFYUI_FAMILIES = ("lora", "lokr", "loha", "full", "oft")

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
    "oft_r": "ComfyUI's OFT rotates a weight's output rows; PEFT's OFT rotates its input, which no "
             "ComfyUI key can say",
    "boft_r": "ComfyUI's BOFT rotates a weight's output rows; PEFT's BOFT rotates its input, which no "
              "ComfyUI key can say",
}


def comfyui_items(items: list[Item]) -> list[Item]:
    """`items` as a ComfyUI target writes them: OFT/BOFT with their constraint applied to the blocks and
    alpha 0 (`oft.baked`), since ComfyUI reads `.alpha` as an absolute bound where LyCORIS and this
    library's other readers read alpha x out; every reader then builds the same rotations."""
    from ..algorithms import oft

    return [replace(i, tensors=oft.baked(i.tensors)) if algorithms.get(i.algorithm).family == "oft" else i
            for i in items]


#: (module, algorithm, DoRA or None, tensors or None): what `comfyui_differences` reads of one module.
Part = tuple[str, str, Dora | None, Mapping[str, torch.Tensor] | None]


def comfyui_differences(parts: Iterable[Part], dora_measured: list[tuple[float, str]] | None = None) -> list[str]:
    """One line per way ComfyUI would apply an adapter differently from the trainers (PEFT, LyCORIS);
    `parts` is (module, algorithm, DoRA or None, tensors or None) per module. Where the tensors are
    given, OFT's and BOFT's differences are measured (`comfyui_gap`); DoRA's where the base weights
    were (`dora_gaps`: (gap, module) per module)."""
    parts = list(parts)
    out = []
    dora_out = [name for name, _, dora, _ in parts if dora is not None and dora.on_out]
    if dora_out:
        if dora_measured:
            worst, name = max(dora_measured)
            size = (f"measured ||W'_ComfyUI - W'|| / ||W' - W|| at most {worst:.3g} ({name}; on this model's "
                    "weights)")
        else:
            size = "it depends on the base weights: give the model with its weights to measure it"
        out.append(
            f"DoRA with a magnitude per output row on {len(dora_out)} module(s) (e.g. {dora_out[0]}): ComfyUI "
            "divides by the base weight's row norms ||W||, PEFT and LyCORIS by ||W + dW||, so each output row "
            f"differs by the factor ||W + dW|| / ||W||, also at strength 1 ({size})."
        )
    oft_parts = [(n, t) for n, a, _, t in parts if a == "oft"]
    if oft_parts:
        line = ("OFT: ComfyUI scales both the rotation and its result by the strength, so strength s acts as "
                "s^2 (at 0.5 ComfyUI applies a quarter of the change, not half)")
        rescaled = [n for n, t in oft_parts if t is not None and "rescale" in t]
        if rescaled:
            line += (f"; it also ignores OFT's per-row rescale ({len(rescaled)} module(s)), so at strength 1 "
                     "the weight change differs: " + _measured(oft_parts, "oft", 1.0))
        else:
            line += "; the same at strength 1 (" + _measured(oft_parts, "oft", 1.0) + ")"
        out.append(line + ".")
    boft_parts = [(n, t) for n, a, _, t in parts if a == "boft"]
    if boft_parts:
        out.append(
            "BOFT: ComfyUI moves each butterfly stage toward the identity by the strength and then scales "
            "the change by it again (LyCORIS does the first only, this library is linear in the strength): "
            "the same at strength 1 (" + _measured(boft_parts, "boft", 1.0) + "), at strength 0.5 it "
            "differs: " + _measured(boft_parts, "boft", 0.5) + "."
        )
    return out


def _measured(parts: list[tuple[str, Mapping[str, torch.Tensor] | None]], algorithm: str, strength: float) -> str:
    """'measured ... at most 0.031 (layers.0...; ...)': the largest `comfyui_gap` over the modules."""
    from ..numerics import one_thread

    with one_thread():  # many small tensors (see numerics.one_thread): ~20 ms of CPU per module
        gaps = [(comfyui_gap(algorithm, t, strength), n) for n, t in parts if t is not None]
    if not gaps:
        return "not measured: no tensors"
    worst, name = max(gaps)
    return (f"measured ||dW_ComfyUI - dW|| / ||dW|| at most {worst:.3g} ({name}; for a base weight of "
            "independent entries)")


def comfyui_gap(algorithm: str, tensors: Mapping[str, torch.Tensor], strength: float) -> float:
    """||dW_ComfyUI - dW|| / ||dW|| at `strength` for W = I (the expected ratio for a base weight of
    i.i.d. entries; exact for out <= 256, else on 32 fixed Gaussian columns), fp64.

    dW is this library's (LyCORIS's at strength 1), linear in the strength. ComfyUI's, restated from
    comfy/weight_adapter/oft.py and boft.py at 3cd7b32: OFT s^2 (R^T - I) W blockwise, `rescale` unused;
    BOFT s (rescale * B_s W - W), B_s the butterfly of stages I + s (R - I)."""
    from ..algorithms import boft, oft

    t = dict(tensors)
    s = float(strength)
    if algorithm == "oft":
        parts = oft.row_parts(t)
        rot = parts["rot"].double()  # R - I per block (n, b, b); W = I makes the delta block-diagonal
        n, b, _ = rot.shape
        eye = torch.eye(b, dtype=torch.float64)
        rescale = parts["rescale"].double().reshape(n, b, 1) if "rescale" in parts else torch.ones(n, b, 1)
        ours = s * (rescale * (eye + rot.transpose(1, 2)) - eye)
        theirs = s * s * rot.transpose(1, 2)
    else:
        parts = boft.row_parts(t)
        rot = parts["rot"].double()
        out = rot.shape[1] * rot.shape[2]
        # W = I exactly for small widths; else 32 fixed Gaussian columns: the ratio of two Frobenius norms
        # over out x 32 values, steady to well under a percent at Z-Image widths, in a few ms per module.
        probe = (torch.eye(out, dtype=torch.float64) if out <= 256 else
                 torch.randn(out, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
        rescale = parts["rescale"].double()[:, None] if "rescale" in parts else torch.ones(out, 1)
        ours = s * (rescale * (probe + boft.butterfly_rows(probe, rot)) - probe)
        theirs = s * (rescale * (probe + boft.butterfly_rows(probe, s * rot)) - probe)
    base = float(torch.linalg.vector_norm(ours))
    return float(torch.linalg.vector_norm(theirs - ours)) / base if base else 0.0


def dora_gaps(items: Iterable[Item], weight: Callable[[str], torch.Tensor | None]) -> list[tuple[float, str]]:
    """(`dora_gap`, module) for every item with a DoRA magnitude per output row whose base weight
    `weight(module)` gives (a fused q/k/v item: the three weights stacked)."""
    from ..keys.aliases import FUSED_QKV, qkv_names
    from ..numerics import one_thread

    out = []
    with one_thread():
        for i in items:
            if i.dora is None or not i.dora.on_out:
                continue
            names = list(qkv_names(i.name[: -len(FUSED_QKV)])) if i.name.endswith(FUSED_QKV) else [i.name]
            ws = [weight(n) for n in names]
            if any(w is None for w in ws):
                continue
            w = torch.cat([x for x in ws if x is not None]).double()
            dw = algorithms.get(i.algorithm).delta(dict(i.tensors), w.float()).double() * i.scale
            out.append((dora_gap(w, dw, i.dora.magnitude.double().reshape(-1, 1)), i.name))
    return out


def dora_gap(w: torch.Tensor, dw: torch.Tensor, m: torch.Tensor) -> float:
    """||W'_ComfyUI - W'|| / ||W' - W|| at strength 1 for DoRA per output row: W' = m V / ||V|| (PEFT,
    LyCORIS), ComfyUI's `weight_decompose` (comfy/weight_adapter/base.py at 3cd7b32) m V / (||W|| + eps),
    V = W + dW, norms per row."""
    v = w + dw
    ours = m * v / v.norm(dim=1, keepdim=True)
    theirs = m * v / (w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    change = float((ours - w).norm())
    return float((theirs - ours).norm()) / change if change else 0.0


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
