"""The lookup from any spelling of a module name to the model's own module (and rows).

Built from the model's `named_modules()`, never from a list of layer names: any Z-Image config, the
split (diffusers) and the fused-qkv (ComfyUI-native) trees, and models with extra modules all work.
Each module is registered under its dotted name, its underscore-flattened name (kohya and LyCORIS
keys), and the alias spellings from `aliases.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .aliases import FUSED_QKV, SPLIT_QKV, alias_names


@dataclass(frozen=True)
class Site:
    """Where a file stem lands.

    kind "direct": the whole of `modules[0]`; "rows": rows [start, stop) of `modules[0]` (split key on a
    fused qkv Linear); "split": the fused stem covers `modules` in order (fused key on split layers).
    `native`: the stem spelled the model's own way (no alias or fusion involved).
    """

    kind: str
    modules: tuple[str, ...]
    rows: tuple[int, int] | None = None
    native: bool = True


@dataclass(frozen=True)
class ModuleShape:
    """(out, in) of a Linear-like module, or (n,) for a norm weight; `bias`: has a bias."""

    shape: tuple[int, ...]
    bias: bool
    is_linear: bool


def module_shape(module: torch.nn.Module) -> ModuleShape | None:
    """Shape of anything Linear-like (including quantized Linear subclasses) or a norm with a weight."""
    out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
    bias = getattr(module, "bias", None) is not None
    if isinstance(out_f, int) and isinstance(in_f, int):
        return ModuleShape((out_f, in_f), bias, True)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and not list(module.children()):
        if weight.dim() == 1 and "norm" in type(module).__name__.lower():
            return ModuleShape(tuple(weight.shape), bias, False)
    return None


def named_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """`model.named_modules()`, listed whole. Resolving a file runs outside the change lock, so another
    thread's change may wrap or unwrap a layer during the walk ("dictionary changed size during
    iteration"): the walk starts again. Changes to the module tree are short, so a few tries do."""
    for _ in range(200):
        try:
            return list(model.named_modules())
        except RuntimeError:
            time.sleep(0.001)
    return list(model.named_modules())


class ModuleIndex:
    """Every adaptable module of a model, under every spelling a file may use."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.shapes: dict[str, ModuleShape] = {}
        for name, module in named_modules(model):
            if not name:
                continue
            shape = module_shape(module)
            if shape is not None:
                self.shapes[name] = shape
        self.dotted: dict[str, Site] = {}
        self._build()
        self.flat: dict[str, Site] = {}
        self.ambiguous_flat: set[str] = set()
        for name, site in self.dotted.items():
            self._add_flat(_flatten(name), site)

    # -- building ---------------------------------------------------------------------------------
    def _build(self) -> None:
        for name in self.shapes:
            self.dotted[name] = Site("direct", (name,))
        for name in list(self.shapes):
            for alias in alias_names(name):
                self.dotted.setdefault(alias, Site("direct", (name,), native=False))
            self._add_qkv(name)

    def _add_qkv(self, name: str) -> None:
        # Fused stem on a split model: register '<block>.attention.qkv' -> to_q, to_k, to_v.
        if name.endswith(SPLIT_QKV[0]):
            block = name[: -len(SPLIT_QKV[0])]
            parts = tuple(block + p for p in SPLIT_QKV)
            if all(p in self.shapes and self.shapes[p].is_linear for p in parts):
                self.dotted.setdefault(block + FUSED_QKV, Site("split", parts, native=False))
        # Split stems on a fused model: register '<block>.attention.to_q' -> rows of qkv.
        if name.endswith(FUSED_QKV) and self.shapes[name].is_linear:
            block = name[: -len(FUSED_QKV)]
            out = self.shapes[name].shape[0]
            if out % 3 == 0:
                d = out // 3
                for i, part in enumerate(SPLIT_QKV):
                    self.dotted.setdefault(block + part, Site("rows", (name,), (i * d, (i + 1) * d), native=False))

    def _add_flat(self, flat: str, site: Site) -> None:
        if flat in self.ambiguous_flat:
            return
        existing = self.flat.get(flat)
        if existing is not None and existing != site:
            # Two modules flatten to the same string: only their dotted names can tell them apart.
            del self.flat[flat]
            self.ambiguous_flat.add(flat)
            return
        self.flat[flat] = site

    # -- lookup -----------------------------------------------------------------------------------
    def lookup(self, stem: str) -> Site | None:
        site = self.dotted.get(stem)
        if site is not None:
            return site
        flat = _flatten(stem)
        site = self.flat.get(flat)
        if site is not None:
            return site
        return self._lower().get(flat.lower())

    def _lower(self) -> dict[str, Site]:
        if not hasattr(self, "_lower_cache"):
            lowered: dict[str, Site] = {}
            for k, v in self.flat.items():
                lowered.setdefault(k.lower(), v)
            self._lower_cache = lowered
        return self._lower_cache

    def linear_names(self) -> list[str]:
        return [n for n, s in self.shapes.items() if s.is_linear]


def _flatten(name: str) -> str:
    return name.replace(".", "_")
