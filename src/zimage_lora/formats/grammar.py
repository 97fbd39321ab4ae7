"""The key grammar of adapter files: prefix + module stem + role suffix.

Tables, not parsing logic: each row is a spelling seen in real files. A key splits into the prefix it
carries (which says whose file it is), the module stem (resolved later against the model), and the
role of the tensor (LoRA down, LoKr w1, alpha, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (family, role) for each suffix spelling; longest spellings are tried first.
_SUFFIXES: dict[str, tuple[str, str]] = {}


def _add(family: str, role: str, *spellings: str) -> None:
    for s in spellings:
        _SUFFIXES[s] = (family, role)


_add("lora", "down", ".lora_A.weight", ".lora_down.weight", ".lora.down.weight",
     ".lora_linear_layer.down.weight", "_lora.down.weight", ".lora_A", ".lora_down")
_add("lora", "up", ".lora_B.weight", ".lora_up.weight", ".lora.up.weight",
     ".lora_linear_layer.up.weight", "_lora.up.weight", ".lora_B", ".lora_up")
_add("lora", "mid", ".lora_mid.weight", ".lora.mid.weight", ".lora_mid")
_add("scale", "alpha", ".alpha", ".lora_alpha")
for _i in ("1", "2"):
    _add("lokr", f"w{_i}", f".lokr_w{_i}")
    _add("lokr", f"w{_i}_a", f".lokr_w{_i}_a")
    _add("lokr", f"w{_i}_b", f".lokr_w{_i}_b")
    _add("lokr", f"t{_i}", f".lokr_t{_i}")
    _add("loha", f"w{_i}_a", f".hada_w{_i}_a")
    _add("loha", f"w{_i}_b", f".hada_w{_i}_b")
    _add("loha", f"t{_i}", f".hada_t{_i}")
_add("full", "diff", ".diff")
_add("full", "diff_b", ".diff_b")
_add("dora", "dora_scale", ".dora_scale")
_add("dora", "magnitude", ".lora_magnitude_vector", ".lora_magnitude_vector.weight")

# Algorithms other trainers write that this library does not apply (reported with this reason).
UNSUPPORTED_SUFFIXES = {
    ".oft_blocks": "OFT", ".oft_diag": "OFT", ".oft_R": "OFT", ".boft_R": "BOFT", ".boft_s": "BOFT",
    ".on_input": "IA3", ".weight_ia3": "IA3", ".a1.weight": "GLoRA", ".b1.weight": "GLoRA",
    ".lora_E": "AdaLoRA", ".vera_lambda_b": "VeRA", ".vera_lambda_d": "VeRA",
}

_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
# Most spellings are whole dot segments ('.lora_A.weight'): a key's last 1-3 segments are looked up
# directly, so a header of 200,000 keys costs 200,000 x 3 dict lookups, not x 40 comparisons. The few
# that start inside a segment ('_lora.down.weight') are compared one by one.
_INNER_SUFFIXES = [s for s in _SUFFIX_ORDER if not s.startswith(".")]
_MAX_SEGMENTS = max(s.count(".") for s in _SUFFIXES)
# PEFT names the adapter in the key ('.default' or a user name) right after the role: strip it.
_ADAPTER_SEGMENT = re.compile(r"\.(default|default_0)(?=\.weight$|$)")

# Prefixes that mark the transformer, longest first; the value says whose naming it is.
TRANSFORMER_PREFIXES: dict[str, str] = {
    "base_model.model.transformer.": "peft",
    "base_model.model.": "peft",
    "model.diffusion_model.": "comfy",
    "diffusion_model.": "comfy",
    "transformer.": "diffusers",
    "lora_unet__": "kohya",  # VideoX-Fun: "lora_unet" + "." + "" + "." + module, then '.' -> '_'
    "lora_unet_": "kohya",
    "lora_transformer_": "kohya",
    "lycoris_": "lycoris",
    "unet.": "diffusers",
}
KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_")

# Tensors trainers keep in adapter files that are not adapter weights: reported as ignored trainer
# data (never unmatched adapter keys, never an error, whatever their dtype).
TRAINER_DATA: dict[str, str] = {
    "lokr_factor": "musubi-tuner LoKr factor (networks/lokr.py network buffer)",
}

# Prefixes of text-encoder keys: reported, never applied to the transformer.
TEXT_ENCODER_PREFIXES = (
    "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_te_", "text_encoder.", "text_encoder_2.",
    "text_encoders.", "te.", "te1.", "te2.", "cond_stage_model.", "conditioner.", "text_model.",
    "base_model.model.text_model.", "qwen3.", "lora_qwen",
)


@dataclass(frozen=True)
class ParsedKey:
    key: str
    prefix: str
    stem: str
    family: str
    role: str


def split_role(key: str) -> tuple[str, str, str] | None:
    """(stem_with_prefix, family, role), or None when no known role suffix ends the key."""
    k = key
    if "default" in k:
        k = _ADAPTER_SEGMENT.sub("", k)
        # '.lora_A.default.weight' -> '.lora_A.weight'
        k = k.replace(".default.weight", ".weight")
    for suffix in _INNER_SUFFIXES:
        if k.endswith(suffix) and len(k) > len(suffix):
            return (k[: -len(suffix)], *_SUFFIXES[suffix])
    parts = k.rsplit(".", _MAX_SEGMENTS)
    for n in range(min(_MAX_SEGMENTS, len(parts) - 1), 0, -1):  # longest first; the stem is never empty
        suffix = "." + ".".join(parts[-n:])
        hit = _SUFFIXES.get(suffix)
        if hit is not None and len(k) > len(suffix):
            return (k[: -len(suffix)], *hit)
    return None


def unsupported_algorithm(key: str) -> str | None:
    for suffix, name in UNSUPPORTED_SUFFIXES.items():
        if key.endswith(suffix) or (suffix + ".") in key:
            return name
    return None


def trainer_data(key: str) -> str | None:
    """What a non-adapter tensor is, for keys a trainer leaves beside the adapter weights."""
    return TRAINER_DATA.get(key)


def is_text_encoder(key: str) -> bool:
    return key.startswith(TEXT_ENCODER_PREFIXES)


def strip_prefix(stem: str) -> tuple[str, str]:
    """(prefix, rest). Prefixes are stripped once; what remains is resolved against module names."""
    for prefix in TRANSFORMER_PREFIXES:
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return prefix, stem[len(prefix):]
    return "", stem


def parse_key(key: str) -> ParsedKey | None:
    split = split_role(key)
    if split is None:
        return None
    stem, family, role = split
    prefix, rest = strip_prefix(stem)
    return ParsedKey(key=key, prefix=prefix, stem=rest, family=family, role=role)
