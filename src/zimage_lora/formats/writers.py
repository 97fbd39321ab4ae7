"""Which program wrote a file, from its keys and metadata: the `format` label `inspect` shows (the
facts that change numbers are typed in `formats/trainer_meta.py`).

The rules live with their trainers (`trainers/<name>.py`, `Label`): this module gathers the file's
`Evidence` once and tries every trainer's rules in their order. Where the keys alone cannot tell two
writers apart a rule's label says what the keys are (e.g. "kohya") instead of guessing a program.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Protocol

from .. import trainers
from ..trainers.base import Evidence
from ..trainers.spelling import role_name


class _Group(Protocol):
    prefix: str
    stem: str
    algorithm: str
    alpha: float | None
    keys: dict[str, str]


_SPLIT_STEM = re.compile(r"to[._](q|k|v|out)")


def is_fused(stem: str) -> bool:
    return stem.endswith(_fused_stems())


@cache
def _fused_stems() -> tuple[str, ...]:
    """Module names only native (ComfyUI / original) trees have: the fused qkv, and to_out.0 as 'out'.
    Imported on first use: `keys` imports this package, so a top-level import would be a cycle."""
    from ..keys.aliases import FUSED_QKV, native_name

    out = native_name("attention.to_out.0")
    return FUSED_QKV.rpartition(".")[2], out, out.replace(".", "_")


def evidence(groups: Sequence[_Group], meta: Mapping[str, str], tensor_keys: Iterable[str]) -> Evidence:
    prefixes = frozenset(g.prefix for g in groups)
    return Evidence(
        prefixes=prefixes,
        stems=tuple(g.stem for g in groups),
        algorithms=frozenset(g.algorithm for g in groups),
        roles=frozenset(role_name(k) for k in tensor_keys),
        alphas=any(g.alpha is not None for g in groups),
        fused=any(is_fused(g.stem) for g in groups),
        split=any(_SPLIT_STEM.search(g.stem) for g in groups),
        meta=meta,
        tensor_keys=tuple(tensor_keys),
        namings=frozenset(trainers.PREFIXES[p] for p in prefixes if p in trainers.PREFIXES),
    )


def label(groups: Sequence[_Group], meta: Mapping[str, str], tensor_keys: Iterable[str]) -> str:
    """The writer of the file as far as keys and metadata tell."""
    e = evidence(groups, meta, list(tensor_keys))
    if e.fused and e.split:
        return "mixed (split and fused qkv)"
    for rule in trainers.LABELS:
        text = rule.rule(e)
        if text is not None:
            return text
    return "bare module names"
