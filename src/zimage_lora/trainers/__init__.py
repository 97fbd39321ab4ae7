"""Each trainer's knowledge in one place: one module per trainer (or family of files) ending in
`TRAINER = Trainer(...)` (`base.py` says what each field means), found by this registry.

A trainer module holds its layout rows, the prefixes and spellings its files carry, the evidence
`inspect` names it by, and its scale rule. The generic code reads only the views below:
`layouts/tables.py` (rows, prefixes), `formats/grammar.py` (spellings), `formats/writers.py`
(labels, in `Label.order` over every trainer) and `keys/scales.py` (alpha and scale rules, notes).

To add a trainer: drop a module here with its `TRAINER` (reuse the suffix sets of `spelling.py`),
and test its rows in tests/test_layouts.py.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import ConfigAlpha, Label, Layout, ModuleScale, Note, Trainer

_SHARED = ("base", "scale", "spelling")


def _discover() -> tuple[Trainer, ...]:
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _SHARED and not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            trainer = getattr(module, "TRAINER", None)
            if isinstance(trainer, Trainer):
                found.append(trainer)
    return tuple(found)


TRAINERS: tuple[Trainer, ...] = _discover()

LAYOUTS: dict[str, Layout] = {x.name: x for t in TRAINERS for x in t.layouts}
# The reader strips the first prefix that matches: longest first, so a prefix comes before any
# shorter one it starts with.
PREFIXES: dict[str, str] = dict(sorted(((p, n) for t in TRAINERS for p, n in t.prefixes.items()),
                                       key=lambda pn: -len(pn[0])))
TEXT_ENCODER_PREFIXES: tuple[str, ...] = tuple(p for t in TRAINERS for p in t.text_encoder_prefixes)
COMPANIONS: dict[tuple[str, str], str] = {k: v for t in TRAINERS for k, v in t.companions.items()}
ADAPTER_NAMES: tuple[str, ...] = tuple(n for t in TRAINERS for n in t.adapter_names)
UNSUPPORTED_FORMS: dict[str, tuple[str, str]] = {k: v for t in TRAINERS for k, v in t.unsupported.items()}
TRAINER_DATA: dict[str, str] = {k: v for t in TRAINERS for k, v in t.trainer_data.items()}
LABELS: tuple[Label, ...] = tuple(sorted((x for t in TRAINERS for x in t.labels), key=lambda x: x.order))
NOTES: tuple[Note, ...] = tuple(sorted((x for t in TRAINERS for x in t.notes), key=lambda x: x.order))
CONFIG_ALPHAS = tuple(t.config_alpha for t in TRAINERS if t.config_alpha is not None)
MODULE_SCALES: tuple[ModuleScale, ...] = tuple(t.module_scale for t in TRAINERS if t.module_scale is not None)


def _read_only() -> dict[str, dict[str, tuple[str, ...]]]:
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for t in TRAINERS:
        for family, roles in t.read_only.items():
            for role, spellings in roles.items():
                mine = out.setdefault(family, {})
                mine[role] = mine.get(role, ()) + spellings
    return out


READ_ONLY_SUFFIXES = _read_only()

__all__ = ["ADAPTER_NAMES", "COMPANIONS", "CONFIG_ALPHAS", "ConfigAlpha", "LABELS", "LAYOUTS", "Layout",
           "MODULE_SCALES", "NOTES", "PREFIXES", "READ_ONLY_SUFFIXES", "TEXT_ENCODER_PREFIXES", "TRAINERS",
           "TRAINER_DATA", "Trainer", "UNSUPPORTED_FORMS"]
