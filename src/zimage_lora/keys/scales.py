"""The scale of each module: alpha over rank, with each trainer's own rule for where alpha comes from
and which rank divides it. Every scale says how it was derived (`Scale.rule`), and the choices that
depend on metadata or on one trainer's convention become notes that `inspect` prints.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from .. import algorithms
from ..errors import InvalidFormatError
from ..formats import writers
from ..formats.grammar import KOHYA_PREFIXES
from ..formats.reader import AdapterFile, Group, pattern_value
from ..fp32 import fits_fp32


@dataclass(frozen=True)
class Scale:
    rank: int | None
    scale: float
    alpha: float | None  # the file's alpha for this module (config/metadata alpha where that applies)
    rule: str  # how `scale` was derived, e.g. "alpha/rank (.alpha key)"
    source: str = "key"  # "key", "none", "unused", a metadata/config name, or "musubi-lokr"
    ignored_metadata: str = ""  # a metadata/config alpha that exists but does not describe this module

    @property
    def alpha_used(self) -> bool:
        return self.alpha is not None and self.source != "unused"


def scale_for(file: AdapterFile, group: Group) -> Scale:
    """(rank, scale, alpha, rule) for one module, following the rule of the trainer that wrote it."""
    shapes = {r: s for r, s in group.shapes.items() if r not in ("dora", "diff_b")}
    if group.algorithm == "full":
        return Scale(None, 1.0, None, "1 (full diff)", "none")
    if group.algorithm == "lokr" and _musubi_lokr(file, shapes):
        return _musubi_lokr_scale(file, group, shapes)
    algo = algorithms.get(group.algorithm)
    rank = algo.rank(shapes)
    if rank is None:
        # The algorithm says why its scale is 1 (LyCORIS, ai-toolkit, ComfyUI, diffusers: both LoKr factors
        # full); an alpha the file carries (ai-toolkit: 9999999999, inf in fp16) never enters the math.
        unused = group.alpha is not None
        return Scale(None, 1.0, group.alpha, f"1 ({algo.unit_scale}; alpha unused)" if unused else
                     f"1 ({algo.unit_scale})", "unused" if unused else "none")
    alpha, source, rslora, ignored = _alpha(file, group)
    if alpha is None or alpha == 0 or rank == 0:
        return Scale(rank, 1.0, alpha, "1 (no alpha)" if alpha is None else "1 (alpha 0)", "none", ignored)
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    _check_scale(file, group, alpha, rank, scale)
    where = {"key": ".alpha key"}.get(source, source)
    rule = f"alpha/sqrt(rank) ({where}, rsLoRA)" if rslora else f"alpha/rank ({where})"
    return Scale(rank, scale, alpha, rule, source, ignored)


def _alpha(file: AdapterFile, group: Group) -> tuple[float | None, str, bool, str]:
    """(alpha, where it came from, rsLoRA, the name of a metadata/config alpha that was not applied)."""
    if group.alpha is not None:
        return _finite_key_alpha(file, group), "key", False, ""
    cfg = file.config or {}
    if group.algorithm != "lora" or not cfg:
        return None, "none", False, ""
    if "kohya_alpha" in cfg:
        # kohya's ss_network_alpha means alpha only for kohya-style keys without a per-module .alpha;
        # converters that bake alpha into the weights (musubi-tuner convert_lora.py --target other) copy
        # the source file's metadata, and applying it there would scale the file a second time.
        if group.prefix not in KOHYA_PREFIXES:
            return None, "none", False, "metadata 'ss_network_alpha'"
        return _config_alpha(file, group, cfg["kohya_alpha"]), "metadata 'ss_network_alpha'", False, ""
    if "lora_alpha" in cfg:
        where = "metadata 'lora_adapter_metadata'" if "lora_adapter_metadata" in file.header.metadata else (
            "adapter_config.json")
        # A PEFT config describes PEFT-named factors (lora_A / lora_B), not kohya-style lora_down keys.
        if ".lora_A" not in group.keys.get("down", ""):
            return None, "none", False, where
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, group.stem, file.path)
        if alpha is None:
            alpha = cfg["lora_alpha"]
        return _config_alpha(file, group, alpha), where, bool(cfg.get("use_rslora")), ""
    return None, "none", False, ""


def _musubi_lokr(file: AdapterFile, shapes: dict) -> bool:
    # musubi-tuner's own LoKr keeps w1 whole; a decomposed w1 is LyCORIS's layout, whatever the metadata.
    return "w1" in shapes and writers.musubi_lokr(file.header.metadata, file.header.tensors.keys())


def _musubi_lokr_scale(file: AdapterFile, group: Group, shapes: dict) -> Scale:
    """musubi-tuner networks/lokr.py LoKrModule.get_weight: scale = alpha / dim, dim = w2_a.shape[1]
    for a low-rank w2, max(w2.shape) for a full one; no alpha tensor means alpha = dim (scale 1)."""
    full = "w2" in shapes
    dim = max(shapes["w2"][:2]) if full else shapes["w2_a"][1]
    if group.alpha is None:
        return Scale(dim, 1.0, None, "1 (musubi-tuner LoKr, no alpha)", "none")
    alpha = _finite_key_alpha(file, group)
    scale = alpha / dim
    _check_scale(file, group, alpha, dim, scale)
    what = f"max(lokr_w2 shape) = {dim}" if full else f"rank {dim}"
    # Only a full w2 with scale != 1 is where ComfyUI/diffusers (scale 1 for full factors) differ.
    return Scale(dim, scale, alpha, f"alpha/{what} (musubi-tuner networks/lokr.py)",
                 "musubi-lokr" if full and scale != 1 else "key")


def _finite_key_alpha(file: AdapterFile, group: Group) -> float:
    alpha = group.alpha
    if not math.isfinite(alpha):
        raise InvalidFormatError(
            f"{file.path}: alpha '{group.alpha_key}' is {alpha}; expected a finite number. It sets the scale of "
            f"module '{group.stem}' ({group.algorithm}): fix the alpha in the file."
        )
    return alpha


def _config_alpha(file: AdapterFile, group: Group, alpha: object) -> float | None:
    # Config values come from JSON in the file or folder: anything may be there.
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidFormatError(
            f"{file.path}: the adapter config gives alpha {alpha!r} for module '{group.stem}'; expected a finite "
            "number. Fix 'lora_alpha' / 'alpha_pattern' in adapter_config.json (or lora_adapter_metadata)."
        )
    return float(alpha)


def _check_scale(file: AdapterFile, group: Group, alpha: float, rank: int, scale: float) -> None:
    # Deltas are built in fp32: a scale beyond its range overflows there (found by fuzzing: alpha 1.4e39).
    if not fits_fp32(scale):
        raise InvalidFormatError(
            f"{file.path}: module '{group.stem}': alpha {alpha} / rank {rank} gives scale {scale:g}, beyond the "
            "float32 range. The alpha is corrupt: fix it in the file or its config."
        )


# Where other loaders read the same file differently (ComfyUI's comfy/lora.py reads only per-module
# '.alpha' keys; diffusers' kohya conversion likewise, and it reads lora_adapter_metadata itself).
_OTHER_LOADERS = {
    "metadata 'ss_network_alpha'": "; ComfyUI and diffusers read only per-module .alpha keys, so they run "
    "these modules at scale 1",
    "metadata 'lora_adapter_metadata'": "; ComfyUI does not read this metadata, so it runs these modules at scale 1",
}


def scale_notes(file: AdapterFile, scales: list[tuple[Group, Scale]]) -> list[str]:
    """What `inspect` must say about the scales: every metadata value that set one, every metadata
    alpha that did not apply, unused alphas, and where another loader would give another strength."""
    notes: list[str] = []
    by_source = Counter(s.source for _g, s in scales)
    for source, n in sorted(by_source.items()):
        if source.startswith(("metadata", "adapter_config")):
            values = sorted({s.alpha for _g, s in scales if s.source == source})
            shown = ", ".join(f"{v:g}" for v in values[:5])
            other = _OTHER_LOADERS.get(source, "")
            notes.append(f"the scale of {n} module(s) comes from {source} (alpha {shown}): they carry no "
                         f"per-module alpha{other}")
    ignored = [g for g, s in scales if s.ignored_metadata == "metadata 'ss_network_alpha'"]
    if ignored:
        value = file.header.metadata.get("ss_network_alpha", "?")
        notes.append(
            f"metadata 'ss_network_alpha' = {value} was not applied to {len(ignored)} module(s) (e.g. "
            f"'{ignored[0].source_keys[0]}'): their keys are not kohya-style, so it does not describe them "
            "(musubi-tuner convert_lora.py --target other bakes alpha into lora_A/lora_B and copies this metadata)"
        )
    ignored = [(g, s.ignored_metadata) for g, s in scales if s.ignored_metadata.startswith(("metadata 'lora_",
                                                                                             "adapter_config"))]
    if ignored:
        notes.append(
            f"the alpha in {ignored[0][1]} was not applied to {len(ignored)} module(s) (e.g. "
            f"'{ignored[0][0].source_keys[0]}'): they are not PEFT-named lora_A/lora_B keys, so it does not "
            "describe them"
        )
    # An alpha the algorithm's scale rule never reads (full LoKr factors, IA3): its `unit_scale` says why.
    unused = Counter(g.algorithm for g, s in scales if s.source == "unused")
    for name, n in sorted(unused.items()):
        algo = algorithms.get(name)
        notes.append(f"the alpha of {n} {algo.title or algo.name} module(s) is unused: {algo.unit_scale}, "
                     "so the scale is 1")
    musubi = [s for _g, s in scales if s.source == "musubi-lokr"]
    if musubi:
        shown = ", ".join(f"{v:g}" for v in sorted({s.scale for s in musubi})[:5])
        notes.append(
            f"{len(musubi)} LoKr module(s) follow musubi-tuner's rule (networks/lokr.py): scale = alpha / "
            f"max(lokr_w2 shape) for a full lokr_w2 (here {shown}); ComfyUI and diffusers use scale 1 for full "
            "factors, so there this file runs at another strength"
        )
    return notes
