"""Which keys each application that loads Z-Image adapters reads, and a check that drops nothing.

`convert` names its targets by the application that loads them (`tools/targets.py`); before a written
file is kept, every key is checked against that application's rules here. A key it would skip is a
`LoRAError` naming the module, never a line in another program's log.

The rules are facts about each loader's code, restated as data:

- ComfyUI (pollockjj/ComfyUI at 3cd7b32): `comfy/lora.py` `model_lora_keys_unet` accepts a module
  stem as `lora_unet_` + its native name with '_' for '.', or `diffusion_model.` + its native name
  (both from the model's own state dict[str, Any]), and for Z-Image (`Lumina2`) also the diffusers name
  (`comfy/utils.py` `z_image_to_diffusers`) behind `diffusion_model.`, `transformer.` or `lycoris_`
  (flattened). `load_lora` and the `comfy/weight_adapter/` classes then read only the role suffixes
  in `COMFYUI_SUFFIXES`; any other key is logged "lora key not loaded" and skipped.
- musubi-tuner and diffusers read kohya files as `lora_unet_` + the diffusers module name flattened;
  diffusers, PEFT and ai-toolkit read diffusers module names behind their own prefix. PEFT-based
  loaders (diffusers, PEFT, ai-toolkit's LoRA) wrap Linear layers only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import LoRAError
from ..keys.aliases import FUSED_QKV, native_name, qkv_block
from ..layouts.tables import ALPHA, KOHYA, LYCORIS_ALGOS, PEFT, PEFT_LORA, Spelling


class NotLoadableError(LoRAError):
    """The application a convert target names would skip part of the written file."""


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _suffixes(spelling: Spelling) -> frozenset[str]:
    return frozenset(s for roles in spelling.values() for s in roles.values())


# ComfyUI's role suffixes: `load_lora` (alpha, dora_scale, diff, diff_b, w_norm, b_norm, set_weight)
# and each class of `comfy/weight_adapter/` (LoRA's seven up/down spellings, mid and reshape_weight;
# LoHa; LoKr, which reads no `lokr_t1`; GLoRA; OFT and BOFT).
_COMFY_LORA_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"), (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)
COMFYUI_SUFFIXES = frozenset(
    [s for pair in _COMFY_LORA_PAIRS for s in pair]
    + [".lora_mid.weight", ".reshape_weight", ".alpha", ".dora_scale", ".diff", ".diff_b", ".w_norm",
       ".b_norm", ".set_weight"]
    + [".hada_" + r for r in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")]
    + [".lokr_" + r for r in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")]
    + [f".{r}.weight" for r in ("a1", "a2", "b1", "b2")]
    + [".oft_blocks", ".rescale"]
)


def _native(name: str) -> str:
    block = qkv_block(name)
    return native_name(name if block is None else block + FUSED_QKV)


def comfyui_stems(modules: dict[str, torch.nn.Module]) -> dict[str, str]:
    """Every module stem ComfyUI accepts for a Z-Image model with these diffusers modules -> the
    diffusers module (a split q/k/v stem lands on rows of the native `attention.qkv`)."""
    stems: dict[str, str] = {}
    for name in modules:
        native = _native(name)
        block = qkv_block(name)
        target = name if block is None else block + FUSED_QKV
        stems["lora_unet_" + _flat(native)] = target
        stems["diffusion_model." + native] = target
        for stem in ("diffusion_model." + name, "transformer." + name, "lycoris_" + _flat(name)):
            stems[stem] = name
    return stems


def _diffusers_stems(prefix: str, flat: bool, linear_only: bool, fused: bool = False
                     ) -> Callable[[dict[str, torch.nn.Module]], dict[str, str]]:
    def stems(modules: dict[str, torch.nn.Module]) -> dict[str, str]:
        names = [n for n, m in modules.items() if not linear_only or hasattr(m, "in_features")]
        if fused:  # a q/k/v delta that cannot be split exactly stays on the block's `attention.qkv`
            names += sorted({b + FUSED_QKV for n in names if (b := qkv_block(n)) is not None})
        return {prefix + (_flat(n) if flat else n): n for n in names}

    return stems


@dataclass(frozen=True)
class Loader:
    """One application's key rules: the module stems it accepts and the role suffixes it reads."""

    name: str
    stems: Callable[[dict[str, torch.nn.Module]], dict[str, str]]
    suffixes: frozenset[str]
    why: str  # what it does with a key it does not read


LOADERS: dict[str, Loader] = {
    "comfyui": Loader("ComfyUI", comfyui_stems, COMFYUI_SUFFIXES, "logs 'lora key not loaded' and skips it"),
    # LyCORIS, sd-scripts and musubi-tuner's loaders read every kohya role on any module (flattened name);
    # a fused q/k/v LoKr / LoHa / diff is kept on `attention_qkv` (read by ComfyUI and by this library).
    "kohya": Loader("kohya-style loaders", _diffusers_stems("lora_unet_", True, False, True), _suffixes(KOHYA),
                    "skips it"),
    "diffusers": Loader("diffusers", _diffusers_stems("transformer.", False, True), _suffixes(PEFT),
                        "cannot wrap it (PEFT wraps Linear layers only)"),
    "peft": Loader("PEFT", _diffusers_stems("base_model.model.", False, True),
                   _suffixes(PEFT) | {".lora_magnitude_vector.weight"}, "cannot wrap it (Linear layers only)"),
    "ai-toolkit": Loader("ai-toolkit", _diffusers_stems("diffusion_model.", False, True),
                         _suffixes({"lora": PEFT_LORA, **LYCORIS_ALGOS, "scale": ALPHA}),
                         "cannot wrap it (Linear layers only)"),
}


def dropped(loader: Loader, keys: Iterable[str], modules: dict[str, torch.nn.Module]) -> list[str]:
    """The keys `loader` would not read: no accepted stem followed by a suffix it reads."""
    stems = loader.stems(modules)
    out = []
    for key in keys:
        if not any(key.endswith(s) and key[: -len(s)] in stems for s in loader.suffixes):
            out.append(key)
    return out


def _stem(key: str) -> str:
    """The module part of a written key: the key without the longest role suffix any loader knows."""
    known = [s for loader in LOADERS.values() for s in loader.suffixes if key.endswith(s)]
    return key[: -len(max(known, key=len))] if known else key


def require_loadable(loader: Loader, keys: Iterable[str], modules: dict[str, torch.nn.Module],
                     where: str, to: str, fix: str) -> None:
    """Raise `NotLoadableError` naming each module whose keys `loader` would skip."""
    lost = dropped(loader, keys, modules)
    if not lost:
        return
    stems = sorted({_stem(k) for k in lost})
    shown = ", ".join(repr(k) for k in stems[:4]) + (f" and {len(stems) - 4} more" if len(stems) > 4 else "")
    raise NotLoadableError(
        f"{where}: {loader.name} would not load {len(lost)} key(s) of the --to {to} output, on module(s) "
        f"{shown} ({loader.name} {loader.why}). Nothing was written. {fix}"
    )


__all__ = ["COMFYUI_SUFFIXES", "LOADERS", "Loader", "NotLoadableError", "comfyui_stems", "dropped",
           "require_loadable"]
