"""musubi-tuner (kohya-ss): its Z-Image LoRA is kohya's layout (`kohya.py`); here what is its own:
the ComfyUI export (q/k/v fused), `convert_lora.py --target other` (alpha folded into the factors),
the evidence that names it (its network modules, LoKr's `lokr_factor` buffer), and its two LoKr
scale rules."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import TYPE_CHECKING

from .base import Evidence, Label, Layout, Note, Trainer
from .kohya import KOHYA_PREFIXES, has_kohya_metadata
from .mflux import is_mflux
from .onetrainer import is_onetrainer
from .scale import AlphaFrom, Scale, check_scale, finite_key_alpha
from .spelling import KOHYA, PEFT_DOWN, PEFT_LORA

if TYPE_CHECKING:
    from ..formats.reader import AdapterFile, Group

# musubi-tuner's --network_module values for Z-Image (kohya sd-scripts uses networks.lora, lycoris.kohya).
MUSUBI_MODULES = ("networks.lora_zimage", "networks.lokr", "networks.loha")
# convert_lora.py --target other turns kohya names back into dotted ones by replacing every '_' with
# '.': 'attention.to.q', 'feed.forward.w1', 'adaLN.modulation.0'.
_DOTTED = re.compile(r"\.to\.(q|k|v|out)(\.|$)|feed\.forward\.|adaLN\.modulation\.|final\.layer\.")


class MusubiLoKr(Enum):
    """musubi-tuner's networks/lokr.py has had two scale rules; the file says which wrote it.

    FIRST: commit 0b2d692 (#900): a full `lokr_w2` forces alpha = lora_dim, so its scale is 1
    (`merge_weights_to_tensor`: full matrix mode, scale 1.0); a low-rank w2: alpha / w2_a.shape[1].
    FACTOR: the rewrite that saves the network's `lokr_factor` buffer (and `ss_lokr_factor`
    metadata): alpha / dim with dim = w2_a.shape[1], or max(lokr_w2.shape) for a full w2.
    """

    FIRST = "0b2d692"
    FACTOR = "lokr_factor"


# How notes name each LoKr version, and the evidence that names it.
_VERSION = {
    MusubiLoKr.FIRST: "commit 0b2d692: the file has no 'lokr_factor' buffer or 'ss_lokr_factor' metadata",
    MusubiLoKr.FACTOR: "the version that saves 'lokr_factor'",
}


def musubi_lokr(meta: Mapping[str, str], tensor_keys: Iterable[str]) -> MusubiLoKr | None:
    """Which musubi-tuner LoKr wrote the file, or None (LyCORIS or another LoKr writer).

    The rewrite persists `lokr_factor` (a top-level buffer) and `ss_lokr_factor` (metadata); 0b2d692
    saves neither and names its module `networks.lokr` in `ss_network_module`."""
    if "lokr_factor" in tensor_keys or "ss_lokr_factor" in meta:
        return MusubiLoKr.FACTOR
    module = meta.get("ss_network_module", "")
    if module.endswith(".lokr") and "lycoris" not in module:
        return MusubiLoKr.FIRST
    return None


def is_musubi(meta: Mapping[str, str], tensor_keys: Iterable[str]) -> bool:
    """musubi-tuner: its network module in ss_network_module, or LoKr's top-level 'lokr_factor' buffer."""
    module = meta.get("ss_network_module", "")
    return "lokr_factor" in tensor_keys or "musubi" in module or module.endswith(MUSUBI_MODULES)


def _lokr_scale(file: AdapterFile, group: Group, shapes: Mapping[str, tuple[int, ...]]) -> Scale | None:
    """networks/lokr.py: scale = alpha / dim, dim = w2_a.shape[1] for a low-rank w2; no alpha tensor
    means alpha = dim (scale 1). A full w2: the rewrite (`MusubiLoKr.FACTOR`) divides by
    max(w2.shape); 0b2d692 (`MusubiLoKr.FIRST`) forces alpha = lora_dim there, so its scale is 1."""
    rule = file.meta.musubi_lokr
    # musubi-tuner's own LoKr keeps w1 whole; a decomposed w1 is LyCORIS's layout, whatever the metadata.
    if group.algorithm != "lokr" or "w1" not in shapes or rule is None:
        return None
    full = "w2" in shapes
    dim = max(shapes["w2"][:2]) if full else shapes["w2_a"][1]
    where = f"musubi-tuner networks/lokr.py {rule.value}"
    if full and rule is MusubiLoKr.FIRST:
        return Scale(dim, 1.0, group.alpha, f"1 (full lokr_w2: alpha forced to the rank; {where})",
                     AlphaFrom.UNUSED if group.alpha is not None else AlphaFrom.NONE, trainer=rule)
    if group.alpha is None:
        return Scale(dim, 1.0, None, f"1 ({where}, no alpha)", AlphaFrom.NONE, trainer=rule)
    alpha = finite_key_alpha(file, group)
    scale = alpha / dim
    check_scale(file, group, alpha, dim, scale)
    what = f"max(lokr_w2 shape) = {dim}" if full else f"rank {dim}"
    return Scale(dim, scale, alpha, f"alpha/{what} ({where})", AlphaFrom.KEY, trainer=rule)


def _notes(file: AdapterFile, scales: list[tuple[Group, Scale]]) -> list[str]:
    """Which of the LoKr rules set the scales, why, and where other loaders differ."""
    notes = []
    for rule in MusubiLoKr:
        mine = [(g, s) for g, s in scales if s.trainer is rule]
        if not mine:
            continue
        full = [s for g, s in mine if "w2" in g.shapes]
        text = (f"{len(mine)} LoKr module(s) follow musubi-tuner's rule (networks/lokr.py, {_VERSION[rule]}): "
                "scale = alpha / rank")
        if rule is MusubiLoKr.FACTOR:
            text += ", and alpha / max(lokr_w2 shape) for a full lokr_w2"
            differ = sorted({s.scale for s in full if s.scale != 1})
            if differ:
                shown = ", ".join(f"{v:g}" for v in differ[:5])
                text += (f" (here {shown}); ComfyUI and diffusers use scale 1 for full factors, so there this file "
                         "runs at another strength")
        else:
            text += ", and 1 for a full lokr_w2 (it saves alpha = lora_dim there)"
            differ = sorted({s.alpha / s.rank for s in full if s.alpha is not None and s.rank and s.alpha != s.rank})
            if differ:
                shown = ", ".join(f"{v:g}" for v in differ[:5])
                text += (f"; musubi-tuner's later networks/lokr.py would apply alpha / max(lokr_w2 shape) = {shown} "
                         "to this file")
        notes.append(text)
    return notes


def _kohya_keys(e: Evidence) -> str | None:
    if "kohya" not in e.namings or not is_musubi(e.meta, e.tensor_keys):
        return None
    kind = "musubi-tuner" + (" lokr" if "lokr" in e.algorithms else "")
    # networks/convert_z_image_lora_to_comfy.py fuses q/k/v (alpha x3) and renames to_out_0 -> out.
    return kind + (" comfyui export (fused qkv)" if e.fused else "")


def _converted(e: Evidence) -> str | None:
    # convert_lora.py --target other: LoRA as lora_A/lora_B without any alpha, and either the kohya
    # metadata it copies from its source or its '_' -> '.' module names. LoHa/LoKr keep their factors
    # and alpha under 'diffusion_model.', with the copied metadata naming musubi's own module.
    if is_onetrainer(e.meta) or is_mflux(e.meta):
        return None
    if e.algorithms & {"lokr", "loha"}:
        hit = is_musubi(e.meta, e.tensor_keys) and not e.prefixes & set(KOHYA_PREFIXES)
    elif e.alphas or PEFT_DOWN not in e.roles:
        hit = False
    else:
        hit = has_kohya_metadata(e.meta) or any(_DOTTED.search(s) for s in e.stems)
    return "musubi-tuner convert_lora.py --target other (alpha in the weights)" if hit else None


TRAINER = Trainer(
    name="musubi-tuner",
    layouts=(
        Layout("kohya-fused", "musubi-tuner networks/convert_z_image_lora_to_comfy.py (q/k/v fused, alpha x3)",
               "lora_unet_", KOHYA, flat=True, native=True, fused_qkv=True),
        # The tool also turns every '_' of the module name into '.' ('attention.to.q'); the row writes the
        # diffusers names, which read the same. The metadata is what it copies from a musubi LoRA.
        Layout("musubi-other", "musubi-tuner convert_lora.py --target other (sqrt(alpha / rank) in each factor)",
               "diffusion_model.", {"lora": PEFT_LORA}, alpha="folded",
               metadata={"ss_network_module": "networks.lora_zimage"}),
    ),
    trainer_data={"lokr_factor": "musubi-tuner LoKr factor (networks/lokr.py network buffer)"},
    labels=(Label(32, _kohya_keys), Label(60, _converted)),
    module_scale=_lokr_scale,
    notes=(Note(60, _notes),),
)
