"""The key grammar of adapter files: prefix + module stem + role suffix, read from `layouts.tables`.

The tables say how each trainer spells keys (the same rows `convert` and the example files write
with); this module turns them into lookups. A key splits into the prefix it
carries (which says whose file it is), the module stem (resolved later against the model), and the
role of the tensor (LoRA down, LoKr w1, alpha, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..layouts import tables


# (family, role) for each suffix spelling: every row's spellings (layouts.tables), and those files
# carry that no row writes. Built once at import; the lookups below are plain dicts.
def _spellings() -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    rows = [(f, r, s) for x in tables.LAYOUTS.values() for f, roles in x.suffixes.items() for r, s in roles.items()]
    rows += [(f, r, s) for f, roles in tables.READ_ONLY_SUFFIXES.items() for r, ss in roles.items() for s in ss]
    for family, role, spelling in rows:
        if out.setdefault(spelling, (family, role)) != (family, role):
            raise ValueError(f"layouts: {spelling!r} spells both {out[spelling]} and {(family, role)}")
    return out


_SUFFIXES = _spellings()

# Algorithms other trainers write that this library does not apply (reported with this reason).
UNSUPPORTED_SUFFIXES = tables.UNSUPPORTED_SUFFIXES

_SUFFIX_ORDER = sorted(_SUFFIXES, key=len, reverse=True)
# Most spellings are whole dot segments ('.lora_A.weight'): a key's last 1-3 segments are looked up
# directly, so a header of 200,000 keys costs 200,000 x 3 dict lookups, not x 40 comparisons. The few
# that start inside a segment ('_lora.down.weight') are compared one by one.
_INNER_SUFFIXES = [s for s in _SUFFIX_ORDER if not s.startswith(".")]
_MAX_SEGMENTS = max(s.count(".") for s in _SUFFIXES)
# PEFT names the adapter in the key ('.default' or a user name) right after the role: strip it.
_ADAPTER_SEGMENT = re.compile(r"\.(" + "|".join(tables.PEFT_ADAPTER_NAMES) + r")(?=\.weight$|$)")

# Prefixes that mark the transformer (the first match is stripped); the value says whose naming it is.
TRANSFORMER_PREFIXES: dict[str, str] = tables.PREFIXES
KOHYA_PREFIXES = tuple(p for p, naming in TRANSFORMER_PREFIXES.items() if naming == "kohya")

COMPANIONS = tables.COMPANIONS
TRAINER_DATA = tables.TRAINER_DATA
TEXT_ENCODER_PREFIXES = tables.TEXT_ENCODER_PREFIXES


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
    form = _unsupported(key)
    return None if form is None else form[0]


def unsupported_form(key: str) -> str | None:
    """The form (and its writer) of a key this library does not apply, for the key's reason."""
    form = _unsupported(key)
    return None if form is None else form[1]


def _unsupported(key: str) -> tuple[str, str] | None:
    for suffix, form in tables.UNSUPPORTED_FORMS.items():
        if key.endswith(suffix) or (suffix + ".") in key:
            return form
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
