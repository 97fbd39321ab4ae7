"""PEFT (huggingface/peft): `save_pretrained` folders (adapter_config.json beside the tensors), the
adapter name in its keys, its config's alpha rules (lora_alpha, alpha_pattern, rsLoRA), the forms it
writes that are read only (OFT v2, BOFT) or not applied (OFT v1, IA3, AdaLoRA, VeRA).

diffusers' `lora_adapter_metadata` is the same config JSON (`diffusers.py` finds it)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import InvalidFormatError
from ..formats.untrusted import pattern_value
from .base import ConfigAlpha, Evidence, Label, Layout, Note, Trainer
from .scale import AlphaFrom, ConfigSource, Scale, check_scale
from .spelling import PEFT

if TYPE_CHECKING:
    from ..formats.reader import AdapterFile, Group

PREFIX = "base_model.model."
_CONFIG_ALPHA = {ConfigSource.DIFFUSERS_METADATA: AlphaFrom.DIFFUSERS_METADATA,
                 ConfigSource.PEFT_CONFIG: AlphaFrom.PEFT_CONFIG}

_OFT_V1 = "OFT v1 of PEFT before 0.14 ('oft_r' full blocks with 'oft_s')"
_IA3 = "IA3 in PEFT's form (IA3Config 'ia3_l'; LyCORIS's '.weight' + '.on_input' is supported)"
_VERA = "VeRA (PEFT VeraConfig: its shared random projections are not in the file)"


@dataclass(frozen=True)
class PeftConfig:
    """A PEFT config the file came with: the LoRA alpha rules and, for OFT, how R is built."""

    source: ConfigSource
    values: Mapping[str, object] = field(default_factory=dict)

    def get(self, key: str, default: object = None) -> object:
        return self.values.get(key, default)

    def unsupported_oft_form(self) -> str | None:
        """The PEFT OFTConfig options this library does not apply (algorithms/oft_input.py builds R by
        the 5-term Cayley-Neumann series, PEFT's and OneTrainer's default), named for the message."""
        if str(self.get("peft_type", "")).upper() != "OFT":
            return None
        odd = []
        if self.get("use_cayley_neumann", True) is False:
            odd.append("use_cayley_neumann=false (exact Cayley transform)")
        elif self.get("num_cayley_neumann_terms", 5) != 5:
            odd.append(f"num_cayley_neumann_terms={self.get('num_cayley_neumann_terms')!r} (5 is supported)")
        if self.get("coft", False):
            odd.append("coft=true (constrained OFT projects the rotations on every forward)")
        if not odd:
            return None
        return f"PEFT OFTConfig with {', '.join(odd)}, from {self.source.value}"


def _config_alpha(file: AdapterFile, group: Group) -> ConfigAlpha | None:
    cfg = file.meta.peft
    if cfg is None or "lora_alpha" not in cfg.values:
        return None
    where = _CONFIG_ALPHA[cfg.source]
    # A PEFT config describes PEFT-named factors (lora_A / lora_B), not kohya-style lora_down keys.
    if ".lora_A" not in group.keys.get("down", ""):
        return ConfigAlpha(None, AlphaFrom.NONE, ignored=where)
    patterns = cfg.get("alpha_pattern") or {}
    alpha = pattern_value(patterns, group.stem, file.path)  # checked inside
    if alpha is None:
        alpha = cfg.values["lora_alpha"]
    return ConfigAlpha(_finite(file, group, alpha), where, bool(cfg.get("use_rslora")))


def _lokr_scale(file: AdapterFile, group: Group, shapes: Mapping[str, tuple[int, ...]]) -> Scale | None:
    """PEFT LoKrConfig (tuners/lokr/layer.py `update_layer`): scaling = alpha / r, the config's r and
    alpha (`rank_pattern` / `alpha_pattern` per module, defaults 8 and 8), whatever the factors' shapes:
    a full lokr_w2 does not show r, so the config is where it is."""
    cfg = file.meta.peft
    if group.algorithm != "lokr" or cfg is None or str(cfg.get("peft_type", "")).upper() != "LOKR":
        return None
    r = pattern_value(cfg.get("rank_pattern") or {}, group.stem, file.path)
    r = cfg.get("r", 8) if r is None else r
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, group.stem, file.path)
    alpha = _finite(file, group, cfg.get("alpha", 8) if alpha is None else alpha)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0 or alpha is None:
        raise InvalidFormatError(
            f"{file.path}: the LoKr config gives r {r!r} and alpha {alpha!r} for module '{group.stem}'; expected a "
            "positive integer and a number. Fix 'r' / 'rank_pattern' / 'alpha' in adapter_config.json."
        )
    scale = alpha / r
    check_scale(file, group, alpha, r, scale)
    return Scale(r, scale, alpha, f"alpha/r (PEFT LoKrConfig, {cfg.source.value})", _CONFIG_ALPHA[cfg.source])


def _finite(file: AdapterFile, group: Group, alpha: object) -> float | None:
    # Config values come from JSON in the file or folder: anything may be there.
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidFormatError(
            f"{file.path}: the adapter config gives alpha {alpha!r} for module '{group.stem}'; expected a finite "
            "number. Fix 'lora_alpha' / 'alpha_pattern' in adapter_config.json (or lora_adapter_metadata)."
        )
    return float(alpha)


def _ignored_notes(file: AdapterFile, scales: list[tuple[Group, Scale]]) -> list[str]:
    ignored = [(g, s.ignored_metadata) for g, s in scales
               if s.ignored_metadata in (AlphaFrom.DIFFUSERS_METADATA, AlphaFrom.PEFT_CONFIG)]
    if not ignored:
        return []
    g0, where = ignored[0]
    return [
        f"the alpha in {where.value if where else ''} was not applied to {len(ignored)} module(s) (e.g. "
        f"'{g0.source_keys[0]}'): they are not PEFT-named lora_A/lora_B keys, so it does not describe them"
    ]


def _label(e: Evidence) -> str | None:
    return "peft" if any(p.startswith(PREFIX) for p in e.prefixes) else None


TRAINER = Trainer(
    name="peft",
    layouts=(Layout("peft", "PEFT save_pretrained (a folder with adapter_config.json)",
                    PREFIX, PEFT, alpha="config", folder=True),),
    prefixes={"base_model.model.transformer.": "peft", PREFIX: "peft"},  # around a whole pipeline, or a model
    text_encoder_prefixes=("base_model.model.text_model.",),
    read_only={
        "dora": {"magnitude": (".lora_magnitude_vector.weight",)},
        # OFT v2 (OFTConfig save_pretrained): algorithms/oft_input.py; BOFTConfig: algorithms/boft_input.py.
        # Read only: no layout row writes them (convert refuses with the reason).
        "oft_r": {"oft_R": (".oft_R.weight",)},
        "boft_r": {"boft_R": (".boft_R",), "boft_s": (".boft_s",)},
    },
    adapter_names=("default", "default_0"),  # '.lora_A.default.weight': the reader strips these names
    # Forms it writes that this library does not apply yet: suffix -> (algorithm, the form and its
    # writer). Adding one moves its suffixes from here into a family of the spellings.
    unsupported={
        ".oft_r": ("OFT", _OFT_V1), ".oft_s": ("OFT", _OFT_V1),
        ".weight_ia3": ("IA3", _IA3), ".ia3_l": ("IA3", _IA3),
        ".lora_E": ("AdaLoRA", "AdaLoRA (PEFT AdaLoraConfig: 'lora_E' singular values)"),
        ".vera_lambda_b": ("VeRA", _VERA), ".vera_lambda_d": ("VeRA", _VERA),
    },
    labels=(Label(40, _label),),
    config_alpha=_config_alpha,
    module_scale=_lokr_scale,
    notes=(Note(30, _ignored_notes),),
)
