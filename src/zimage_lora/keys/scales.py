"""The scale of each module: alpha over rank, with each trainer's own rule for where alpha comes from
and which rank divides it (`trainers/<name>.py`: `config_alpha`, `module_scale`, `notes`). Every scale
says how it was derived (`Scale.rule`, display text) and, as types, where its alpha came from
(`Scale.source`) and which trainer rule set it (`Scale.trainer`): the numbers and the notes `inspect`
prints depend only on the types, so a message can be reworded without changing a scale.
"""

from __future__ import annotations

import math
from collections import Counter

from .. import algorithms, trainers
from ..formats.reader import AdapterFile, Group
from ..trainers.base import ConfigAlpha
from ..trainers.scale import AlphaFrom, Scale, check_scale, finite_key_alpha

__all__ = ["AlphaFrom", "Scale", "scale_for", "scale_notes"]


def scale_for(file: AdapterFile, group: Group) -> Scale:
    """(rank, scale, alpha, rule) for one module, following the rule of the trainer that wrote it."""
    shapes = {r: s for r, s in group.shapes.items() if r not in ("dora", "diff_b")}
    if group.algorithm == "full":
        return Scale(None, 1.0, None, "1 (full diff)", AlphaFrom.NONE)
    for own_rule in trainers.MODULE_SCALES:  # a trainer's own rule for this module (musubi-tuner's LoKr)
        own = own_rule(file, group, shapes)
        if own is not None:
            return own
    algo = algorithms.get(group.algorithm)
    rank = algo.rank(shapes)
    if rank is None:
        # The algorithm says why its scale is 1 (LyCORIS, ai-toolkit, ComfyUI, diffusers: both LoKr factors
        # full); an alpha the file carries (ai-toolkit: 9999999999, inf in fp16) never enters the math.
        unused = group.alpha is not None
        return Scale(None, 1.0, group.alpha, f"1 ({algo.unit_scale}; alpha unused)" if unused else
                     f"1 ({algo.unit_scale})", AlphaFrom.UNUSED if unused else AlphaFrom.NONE)
    alpha, source, rslora, ignored = _alpha(file, group)
    if alpha is None or alpha == 0 or rank == 0:
        return Scale(rank, 1.0, alpha, "1 (no alpha)" if alpha is None else "1 (alpha 0)", AlphaFrom.NONE, ignored)
    scale = alpha / math.sqrt(rank) if rslora else alpha / rank
    check_scale(file, group, alpha, rank, scale)
    rule = f"alpha/sqrt(rank) ({source.value}, rsLoRA)" if rslora else f"alpha/rank ({source.value})"
    return Scale(rank, scale, alpha, rule, source, ignored)


def _alpha(file: AdapterFile, group: Group) -> ConfigAlpha:
    """The module's own `.alpha`, else (LoRA only) a file-wide alpha by the first trainer rule that has one."""
    if group.alpha is not None:
        return ConfigAlpha(finite_key_alpha(file, group), AlphaFrom.KEY)
    if group.algorithm == "lora":
        for rule in trainers.CONFIG_ALPHAS:
            found = rule(file, group)
            if found is not None:
                return found
    return ConfigAlpha(None, AlphaFrom.NONE)


# Where other loaders read the same file differently (ComfyUI's comfy/lora.py reads only per-module
# '.alpha' keys; diffusers' kohya conversion likewise, and it reads lora_adapter_metadata itself).
_OTHER_LOADERS = {
    AlphaFrom.KOHYA_METADATA: "; ComfyUI and diffusers read only per-module .alpha keys, so they run "
    "these modules at scale 1",
    AlphaFrom.DIFFUSERS_METADATA: "; ComfyUI does not read this metadata, so it runs these modules at scale 1",
}


def scale_notes(file: AdapterFile, scales: list[tuple[Group, Scale]]) -> list[str]:
    """What `inspect` must say about the scales: every metadata value that set one, every metadata
    alpha that did not apply, unused alphas, and where another loader would give another strength."""
    notes: list[tuple[int, list[str]]] = [(0, _config_notes(scales)), (50, _unused_notes(scales))]
    notes += [(note.order, note.notes(file, scales)) for note in trainers.NOTES]
    return [text for _order, texts in sorted(notes, key=lambda on: on[0]) for text in texts]


def _config_notes(scales: list[tuple[Group, Scale]]) -> list[str]:
    notes: list[str] = []
    by_source = Counter(s.source for _g, s in scales if s.source.from_config)
    for source, n in sorted(by_source.items(), key=lambda kv: kv[0].value):
        values = sorted({s.alpha for _g, s in scales if s.source is source and s.alpha is not None})
        shown = ", ".join(f"{v:g}" for v in values[:5])
        notes.append(f"the scale of {n} module(s) comes from {source.value} (alpha {shown}): they carry no "
                     f"per-module alpha{_OTHER_LOADERS.get(source, '')}")
    return notes


def _unused_notes(scales: list[tuple[Group, Scale]]) -> list[str]:
    # An alpha the algorithm's scale rule never reads (full LoKr factors, IA3): its `unit_scale` says why.
    notes: list[str] = []
    unused = Counter(g.algorithm for g, s in scales if s.source is AlphaFrom.UNUSED and s.trainer is None)
    for name, n in sorted(unused.items()):
        algo = algorithms.get(name)
        notes.append(f"the alpha of {n} {algo.title or algo.name} module(s) is unused: {algo.unit_scale}, "
                     "so the scale is 1")
    return notes
