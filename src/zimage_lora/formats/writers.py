"""Which program wrote a file, from its keys and metadata: the `format` label `inspect` shows (the
facts that change numbers are typed in `formats/trainer_meta.py`).

Each rule names the evidence it uses; where the keys alone cannot tell two writers apart the label
says what the keys are (e.g. "kohya") instead of guessing a program.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import Protocol

from ..layouts.tables import KOHYA_LORA, LAYOUTS, MFLUX_MARKS, MUSUBI_MODULES, ONETRAINER_MARKS, PEFT_LORA, PREFIXES
from .grammar import KOHYA_PREFIXES


class _Group(Protocol):
    prefix: str
    stem: str
    algorithm: str
    alpha: float | None
    keys: dict[str, str]


# The prefixes and role names the rules below look for, as the layout rows write them.
_LYCORIS = LAYOUTS["lycoris"].prefix
_VIDEOX = LAYOUTS["videox-fun"].prefix
_DIFFUSERS = LAYOUTS["diffusers"].prefix
_PEFT = LAYOUTS["peft"].prefix
_COMFY = frozenset(p for p, naming in PREFIXES.items() if naming == "comfy")
_SPLIT_STEM = re.compile(r"to[._](q|k|v|out)")
# musubi-tuner's convert_lora.py --target other turns kohya names back into dotted ones by replacing
# every '_' with '.': 'attention.to.q', 'feed.forward.w1', 'adaLN.modulation.0'.
_MUSUBI_DOTTED = re.compile(r"\.to\.(q|k|v|out)(\.|$)|feed\.forward\.|adaLN\.modulation\.|final\.layer\.")


def is_fused(stem: str) -> bool:
    return stem.endswith(_fused_stems())


@cache
def _fused_stems() -> tuple[str, ...]:
    """Module names only native (ComfyUI / original) trees have: the fused qkv, and to_out.0 as 'out'.
    Imported on first use: `keys` imports this package, so a top-level import would be a cycle."""
    from ..keys.aliases import FUSED_QKV, native_name

    out = native_name("attention.to_out.0")
    return FUSED_QKV.rpartition(".")[2], out, out.replace(".", "_")


def is_onetrainer(meta: dict[str, str]) -> bool:
    return any(k in meta for k in ONETRAINER_MARKS)


def is_mflux(meta: dict[str, str]) -> bool:
    return any(k in meta for k in MFLUX_MARKS)


def is_musubi(meta: dict[str, str], tensor_keys: Iterable[str]) -> bool:
    """musubi-tuner: its network module in ss_network_module, or LoKr's top-level 'lokr_factor' buffer."""
    module = meta.get("ss_network_module", "")
    return "lokr_factor" in tensor_keys or "musubi" in module or module.endswith(MUSUBI_MODULES)


def has_kohya_metadata(meta: dict[str, str]) -> bool:
    return any(k.startswith("ss_network_") for k in meta)


def label(groups: Sequence[_Group], meta: dict[str, str], tensor_keys: Iterable[str]) -> str:
    """The writer of the file as far as keys and metadata tell."""
    tensor_keys = list(tensor_keys)
    prefixes = {g.prefix for g in groups}
    algos = {g.algorithm for g in groups}
    fused = any(is_fused(g.stem) for g in groups)
    split = any(_SPLIT_STEM.search(g.stem) for g in groups)
    roles = {_role(k) for k in tensor_keys}
    alphas = any(g.alpha is not None for g in groups)
    if fused and split:
        return "mixed (split and fused qkv)"
    if _LYCORIS in prefixes:
        return "lycoris"
    if prefixes & set(KOHYA_PREFIXES):
        return _kohya_label(prefixes, fused, meta, tensor_keys, algos)
    if any(p.startswith(_PEFT) for p in prefixes):
        return "peft"
    if is_mflux(meta):  # its metadata names it, whatever prefix the version wrote
        return "mflux"
    if _musubi_converted(groups, meta, roles, alphas, algos, tensor_keys):
        return "musubi-tuner convert_lora.py --target other (alpha in the weights)"
    if prefixes & _COMFY:
        return _comfy_prefix_label(fused, meta, roles, alphas, algos)
    if _DIFFUSERS in prefixes:
        if is_onetrainer(meta):
            return "onetrainer (legacy)" if _KOHYA_DOWN in roles else "onetrainer (diffusers)"
        if _KOHYA_DOWN in roles:
            return "onetrainer (legacy)"
        return "diffusers"
    if any(".default." in k or k.endswith(".default") for k in tensor_keys):
        return "diffsynth"
    if is_onetrainer(meta):
        return "onetrainer (original)"
    if algos & {"lokr", "loha"}:
        return "bare module names (lycoris)"
    if alphas:
        return "onetrainer"
    return "bare module names"


def _kohya_label(prefixes: set[str], fused: bool, meta: dict[str, str], tensor_keys: list[str], algos: set[str]) -> str:
    if _VIDEOX in prefixes:
        # VideoX-Fun lora_utils.LoRANetwork: "lora_unet" + "." + "" + "." + module, dots -> '_'.
        return "videox-fun (kohya keys, lora_unet__)"
    if is_onetrainer(meta):
        return "onetrainer (kohya)"
    if is_musubi(meta, tensor_keys):
        kind = "musubi-tuner" + (" lokr" if "lokr" in algos else "")
        # networks/convert_z_image_lora_to_comfy.py fuses q/k/v (alpha x3) and renames to_out_0 -> out.
        return kind + (" comfyui export (fused qkv)" if fused else "")
    return "kohya (fused qkv)" if fused else "kohya"


def _role(key: str) -> str:
    """'x.lora_A.default.weight' -> 'lora_A'; 'x.alpha' -> 'alpha'."""
    parts = key.split(".")
    parts = [p for p in parts[:-1] if p != "default"] + parts[-1:]
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]


_KOHYA_DOWN = _role(KOHYA_LORA["down"])  # 'lora_down'
_PEFT_DOWN = _role(PEFT_LORA["down"])  # 'lora_A'


def _musubi_converted(
    groups: Sequence[_Group], meta: dict[str, str], roles: set[str], alphas: bool, algos: set[str],
    tensor_keys: list[str],
) -> bool:
    # convert_lora.py --target other: LoRA as lora_A/lora_B without any alpha, and either the kohya
    # metadata it copies from its source or its '_' -> '.' module names. LoHa/LoKr keep their factors
    # and alpha under 'diffusion_model.', with the copied metadata naming musubi's own module.
    if is_onetrainer(meta) or is_mflux(meta):
        return False
    if algos & {"lokr", "loha"}:
        return is_musubi(meta, tensor_keys) and not any(g.prefix in _KOHYA_SET for g in groups)
    if alphas or _PEFT_DOWN not in roles:
        return False
    return has_kohya_metadata(meta) or any(_MUSUBI_DOTTED.search(g.stem) for g in groups)


_KOHYA_SET = frozenset(KOHYA_PREFIXES)


def is_diffusion_pipe(meta: dict[str, str]) -> bool:
    """tdrussell/diffusion-pipe models/z_image.py save_adapter: the PEFT state dict under
    'diffusion_model.' (ComfyUI's names), saved with metadata {'format': 'pt'} and nothing else."""
    return dict(meta) == {"format": "pt"}


def _comfy_prefix_label(fused: bool, meta: dict[str, str], roles: set[str], alphas: bool, algos: set[str]) -> str:
    if is_onetrainer(meta):
        return "onetrainer (comfy)"
    if is_diffusion_pipe(meta):
        return "diffusion-pipe (PEFT on ComfyUI's names" + (", fused qkv)" if fused else ")")
    if algos & {"lokr", "loha"}:
        if _AI_TOOLKIT in meta.get("software", ""):
            return "ai-toolkit (lycoris)"
        return ("unknown writer (LyCORIS factors under ComfyUI's 'diffusion_model.' names, no metadata naming "
                "the writer; ai-toolkit, diffusion-pipe and musubi-tuner's converter write these keys)")
    if fused:
        return "comfyui-native (fused qkv: ComfyUI training/extract nodes, Civitai)"
    if _KOHYA_DOWN in roles:
        return "comfyui"
    if alphas:
        # lora_A/lora_B with a per-module alpha on diffusers names: OneTrainer's COMFY output.
        return "comfyui keys with lora_A/lora_B + alpha (OneTrainer's COMFY output writes these; no metadata names it)"
    # ai-toolkit (and mflux without its metadata) write diffusion_model. + lora_A/lora_B, no alpha.
    return "ai-toolkit"


_AI_TOOLKIT = '"ai-toolkit"'  # ai-toolkit's 'software' metadata: {"name": "ai-toolkit", ...}
