"""The scale of each module: alpha over rank, with each trainer's own rule for where alpha comes from
and which rank divides it. Every scale says how it was derived (`Scale.rule`, display text) and,
as types, where its alpha came from (`Scale.source`) and which trainer rule set it (`Scale.trainer`):
the numbers and the notes `inspect` prints depend only on the types, so a message can be reworded
without changing a scale.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .. import algorithms
from ..errors import InvalidFormatError
from ..formats.grammar import KOHYA_PREFIXES
from ..formats.reader import AdapterFile, Group, pattern_value
from ..formats.trainer_meta import ConfigSource, MusubiLoKr
from ..fp32 import fits_fp32


class AlphaFrom(Enum):
    """Where the alpha that sets a scale came from (the value is how messages name it)."""

    KEY = ".alpha key"  # a per-module alpha tensor
    NONE = "none"  # no alpha (or alpha 0): scale 1
    UNUSED = "unused"  # the file has one, the algorithm's scale rule never reads it
    KOHYA_METADATA = "metadata 'ss_network_alpha'"
    DIFFUSERS_METADATA = ConfigSource.DIFFUSERS_METADATA.value
    PEFT_CONFIG = ConfigSource.PEFT_CONFIG.value

    @property
    def from_config(self) -> bool:
        """A file-wide value (metadata or config), not the module's own alpha."""
        return self in (AlphaFrom.KOHYA_METADATA, AlphaFrom.DIFFUSERS_METADATA, AlphaFrom.PEFT_CONFIG)


_CONFIG_ALPHA = {ConfigSource.DIFFUSERS_METADATA: AlphaFrom.DIFFUSERS_METADATA,
                 ConfigSource.PEFT_CONFIG: AlphaFrom.PEFT_CONFIG}


@dataclass(frozen=True)
class Scale:
    rank: int | None
    scale: float
    alpha: float | None  # the file's alpha for this module (config/metadata alpha where that applies)
    rule: str  # how `scale` was derived, for display only, e.g. "alpha/rank (.alpha key)"
    source: AlphaFrom = AlphaFrom.KEY
    ignored_metadata: AlphaFrom | None = None  # a metadata/config alpha that exists but does not describe this module
    trainer: MusubiLoKr | None = None  # a trainer's own rule that set the scale

    @property
    def alpha_used(self) -> bool:
        return self.alpha is not None and self.source is not AlphaFrom.UNUSED


def scale_for(file: AdapterFile, group: Group) -> Scale:
    """(rank, scale, alpha, rule) for one module, following the rule of the trainer that wrote it."""
    shapes = {r: s for r, s in group.shapes.items() if r not in ("dora", "diff_b")}
    if group.algorithm == "full":
        return Scale(None, 1.0, None, "1 (full diff)", AlphaFrom.NONE)
    if group.algorithm == "lokr" and "w1" in shapes and file.meta.musubi_lokr is not None:
        # musubi-tuner's own LoKr keeps w1 whole; a decomposed w1 is LyCORIS's layout, whatever the metadata.
        return _musubi_lokr_scale(file, group, shapes, file.meta.musubi_lokr)
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
    _check_scale(file, group, alpha, rank, scale)
    rule = f"alpha/sqrt(rank) ({source.value}, rsLoRA)" if rslora else f"alpha/rank ({source.value})"
    return Scale(rank, scale, alpha, rule, source, ignored)


def _alpha(file: AdapterFile, group: Group) -> tuple[float | None, AlphaFrom, bool, AlphaFrom | None]:
    """(alpha, where it came from, rsLoRA, a metadata/config alpha that was not applied)."""
    if group.alpha is not None:
        return _finite_key_alpha(file, group), AlphaFrom.KEY, False, None
    meta = file.meta
    if group.algorithm != "lora":
        return None, AlphaFrom.NONE, False, None
    if meta.kohya_alpha is not None:
        # kohya's ss_network_alpha means alpha only for kohya-style keys without a per-module .alpha;
        # converters that bake alpha into the weights (musubi-tuner convert_lora.py --target other) copy
        # the source file's metadata, and applying it there would scale the file a second time.
        if group.prefix not in KOHYA_PREFIXES:
            return None, AlphaFrom.NONE, False, AlphaFrom.KOHYA_METADATA
        return meta.kohya_alpha, AlphaFrom.KOHYA_METADATA, False, None
    cfg = meta.peft
    if cfg is not None and "lora_alpha" in cfg.values:
        where = _CONFIG_ALPHA[cfg.source]
        # A PEFT config describes PEFT-named factors (lora_A / lora_B), not kohya-style lora_down keys.
        if ".lora_A" not in group.keys.get("down", ""):
            return None, AlphaFrom.NONE, False, where
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, group.stem, file.path)
        if alpha is None:
            alpha = cfg.values["lora_alpha"]
        return _config_alpha(file, group, alpha), where, bool(cfg.get("use_rslora")), None
    return None, AlphaFrom.NONE, False, None


def _musubi_lokr_scale(
    file: AdapterFile, group: Group, shapes: Mapping[str, tuple[int, ...]], rule: MusubiLoKr
) -> Scale:
    """musubi-tuner networks/lokr.py: scale = alpha / dim, dim = w2_a.shape[1] for a low-rank w2; no
    alpha tensor means alpha = dim (scale 1). A full w2: the rewrite (`MusubiLoKr.FACTOR`) divides by
    max(w2.shape); 0b2d692 (`MusubiLoKr.FIRST`) forces alpha = lora_dim there, so its scale is 1."""
    full = "w2" in shapes
    dim = max(shapes["w2"][:2]) if full else shapes["w2_a"][1]
    where = f"musubi-tuner networks/lokr.py {rule.value}"
    if full and rule is MusubiLoKr.FIRST:
        return Scale(dim, 1.0, group.alpha, f"1 (full lokr_w2: alpha forced to the rank; {where})",
                     AlphaFrom.UNUSED if group.alpha is not None else AlphaFrom.NONE, trainer=rule)
    if group.alpha is None:
        return Scale(dim, 1.0, None, f"1 ({where}, no alpha)", AlphaFrom.NONE, trainer=rule)
    alpha = _finite_key_alpha(file, group)
    scale = alpha / dim
    _check_scale(file, group, alpha, dim, scale)
    what = f"max(lokr_w2 shape) = {dim}" if full else f"rank {dim}"
    return Scale(dim, scale, alpha, f"alpha/{what} ({where})", AlphaFrom.KEY, trainer=rule)


# How notes name each musubi-tuner LoKr version, and the evidence that names it.
_MUSUBI_VERSION = {
    MusubiLoKr.FIRST: "commit 0b2d692: the file has no 'lokr_factor' buffer or 'ss_lokr_factor' metadata",
    MusubiLoKr.FACTOR: "the version that saves 'lokr_factor'",
}


def _finite_key_alpha(file: AdapterFile, group: Group) -> float:
    alpha = group.alpha
    assert alpha is not None  # callers read a key alpha only where the group has one
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
    AlphaFrom.KOHYA_METADATA: "; ComfyUI and diffusers read only per-module .alpha keys, so they run "
    "these modules at scale 1",
    AlphaFrom.DIFFUSERS_METADATA: "; ComfyUI does not read this metadata, so it runs these modules at scale 1",
}


def scale_notes(file: AdapterFile, scales: list[tuple[Group, Scale]]) -> list[str]:
    """What `inspect` must say about the scales: every metadata value that set one, every metadata
    alpha that did not apply, unused alphas, and where another loader would give another strength."""
    notes: list[str] = []
    by_source = Counter(s.source for _g, s in scales if s.source.from_config)
    for source, n in sorted(by_source.items(), key=lambda kv: kv[0].value):
        values = sorted({s.alpha for _g, s in scales if s.source is source and s.alpha is not None})
        shown = ", ".join(f"{v:g}" for v in values[:5])
        notes.append(f"the scale of {n} module(s) comes from {source.value} (alpha {shown}): they carry no "
                     f"per-module alpha{_OTHER_LOADERS.get(source, '')}")
    ignored = [g for g, s in scales if s.ignored_metadata is AlphaFrom.KOHYA_METADATA]
    if ignored:
        value = file.header.metadata.get("ss_network_alpha", "?")
        notes.append(
            f"metadata 'ss_network_alpha' = {value} was not applied to {len(ignored)} module(s) (e.g. "
            f"'{ignored[0].source_keys[0]}'): their keys are not kohya-style, so it does not describe them "
            "(musubi-tuner convert_lora.py --target other bakes alpha into lora_A/lora_B and copies this metadata)"
        )
    peft_ignored = [(g, s.ignored_metadata) for g, s in scales
                    if s.ignored_metadata in (AlphaFrom.DIFFUSERS_METADATA, AlphaFrom.PEFT_CONFIG)]
    if peft_ignored:
        g0, where = peft_ignored[0]
        notes.append(
            f"the alpha in {where.value if where else ''} was not applied to {len(peft_ignored)} module(s) (e.g. "
            f"'{g0.source_keys[0]}'): they are not PEFT-named lora_A/lora_B keys, so it does not describe them"
        )
    # An alpha the algorithm's scale rule never reads (full LoKr factors, IA3): its `unit_scale` says why.
    unused = Counter(g.algorithm for g, s in scales if s.source is AlphaFrom.UNUSED and s.trainer is None)
    for name, n in sorted(unused.items()):
        algo = algorithms.get(name)
        notes.append(f"the alpha of {n} {algo.title or algo.name} module(s) is unused: {algo.unit_scale}, "
                     "so the scale is 1")
    notes += _musubi_notes(scales)
    notes += _constraint_notes(file, [g for g, _s in scales])
    return notes


def _constraint_notes(file: AdapterFile, groups: list[Group]) -> list[str]:
    """OFT/BOFT modules read with ComfyUI's constraint (`OFTConstraint.COMFYUI`), and where LyCORIS differs."""
    mine = [g for g in groups if algorithms.get(g.algorithm).absolute_alpha_role in g.keys]
    if not mine:
        return []
    role = algorithms.get(mine[0].algorithm).absolute_alpha_role
    assert role is not None  # `mine` holds the groups keyed by it
    bounds = [(float(v.float().reshape(-1)[0]), tuple(g.shapes.get("oft_blocks", ())))
              for g in mine for v in file.load([g.keys[role]]).values()]
    shown = ", ".join(f"{a:g}" for a in sorted({a for a, _s in bounds})[:5])
    lycoris = sorted({a * shape[-3] * shape[-1] for a, shape in bounds if len(shape) >= 3})
    titles = sorted({algorithms.get(g.algorithm).title for g in mine})
    return [
        f"{len(mine)} {'/'.join(titles)} module(s) follow ComfyUI's constraint, ||Q||_F <= alpha (here {shown}; "
        f"comfy/weight_adapter/oft.py and boft.py): the file is ComfyUI-native ({file.meta.oft_constraint.value} "
        "rule: diffusion_model. keys, no LyCORIS metadata). LyCORIS bounds ||Q||_F by alpha * out "
        f"({', '.join(f'{v:g}' for v in lycoris[:5])}), so it applies a larger rotation wherever a module's blocks "
        f"exceed {shown}"
    ]


def _musubi_notes(scales: list[tuple[Group, Scale]]) -> list[str]:
    """Which of musubi-tuner's LoKr rules set the scales, why, and where other loaders differ."""
    notes = []
    for rule in MusubiLoKr:
        mine = [(g, s) for g, s in scales if s.trainer is rule]
        if not mine:
            continue
        full = [s for g, s in mine if "w2" in g.shapes]
        text = (f"{len(mine)} LoKr module(s) follow musubi-tuner's rule (networks/lokr.py, {_MUSUBI_VERSION[rule]}): "
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
