"""From a safetensors file to `AdapterFile`: keys grouped per module stem, algorithm and alpha known,
tensor data not yet read (only the tiny alpha scalars are)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .. import algorithms
from ..adapter import Unmatched
from ..errors import InvalidFormatError
from . import grammar, writers
from . import text_encoder as te_keys
from .safetensors_file import FLOAT_DTYPES, Header, TensorInfo, gc_paused, load_tensors, read_header
from .trainer_meta import OFTConstraint, TrainerMeta, trainer_meta
from .untrusted import pattern_value as pattern_value  # PEFT patterns: read by callers from here too


class KeyRole(NamedTuple):
    """Where a key sits in its module's group: the key-table family and the role within it (not
    `apply.layer.Slot`, an adapter on a wrapped layer)."""

    family: str
    role: str


Roles = dict[KeyRole, str]  # (family, role) -> file key, for one module stem


@dataclass
class Group:
    """All tensors of one module stem in the file."""

    prefix: str
    stem: str
    algorithm: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key
    infos: dict[str, TensorInfo] = field(default_factory=dict)  # role -> header info
    alpha: float | None = None
    alpha_key: str | None = None
    dora_key: str | None = None
    dora_role: str | None = None

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {role: info.shape for role, info in self.infos.items()}

    @property
    def source_keys(self) -> tuple[str, ...]:
        keys = list(self.keys.values())
        if self.alpha_key:
            keys.append(self.alpha_key)
        if self.dora_key:
            keys.append(self.dora_key)
        return tuple(keys)


@dataclass
class AdapterFile:
    """One adapter file, grouped but not resolved against a model."""

    path: Path
    header: Header
    groups: list[Group]
    unmatched: list[Unmatched]
    format: str
    meta: TrainerMeta  # what the writer decided that changes numbers (config alpha, LoKr rule, OFT bound)
    ignored: list[Unmatched] = field(default_factory=list)  # trainer data that is not adapter weights

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return load_tensors(self.header, keys)




def read_adapter_file(
    path: str | Path, config: dict[str, object] | None = None, *, component: str = "transformer"
) -> AdapterFile:
    """Group the file's keys; `config` is a PEFT `adapter_config.json` dict when the source had one.

    `component="text_encoder"` reads the text-encoder keys instead (the other keys are left to the
    transformer's read of the same file, not reported twice). Linear in the number of keys: a
    200,000-key header is read and grouped in 1.7 s of CPU (`bench/header.py`); above `MAX_TENSORS`
    it is refused before parsing.
    """
    with gc_paused():
        return _read_adapter_file(path, config, component)


def _read_adapter_file(path: str | Path, config: dict[str, object] | None, component: str) -> AdapterFile:
    header = read_header(path)
    path = header.path
    text_encoder = component == "text_encoder"
    unmatched: list[Unmatched] = []
    ignored: list[Unmatched] = []
    raw: dict[tuple[str, str], Roles] = {}
    for key in header.tensors:
        what = grammar.trainer_data(key)
        if what is not None:
            if not text_encoder:  # listed once, by the transformer's read of the file
                ignored.append(Unmatched(key, f"trainer data, not adapter weights: {what}"))
            continue
        if te_keys.is_text_encoder(key) != text_encoder:
            if not text_encoder:
                unmatched.append(Unmatched(key, te_keys.TRANSFORMER_ONLY_REASON))
            continue
        split = grammar.split_role(key)  # parse_key without building a ParsedKey: headers can be huge
        if split is None:
            unmatched.append(Unmatched(key, _no_suffix(key)))
            continue
        stem, family, role = split
        roles = raw.setdefault((te_keys if text_encoder else grammar).strip_prefix(stem), {})
        where = KeyRole(family, role)
        if where in roles:
            unmatched.append(Unmatched(key, f"duplicate of '{roles[where]}' (same module and role); ignored"))
            continue
        roles[where] = key

    for roles in raw.values():
        _drop_lonely(roles, unmatched)
    comfy_native = bool(raw) and all(grammar.TRANSFORMER_PREFIXES.get(p) == "comfy" for p, _stem in raw)
    meta = trainer_meta(header, config, component, comfy_native)
    groups: list[Group] = []
    alpha_tensors = [roles[_ALPHA] for roles in raw.values() if _ALPHA in roles]
    alphas = _read_alphas(header, alpha_tensors)
    for (prefix, stem), roles in raw.items():
        group = _make_group(header, prefix, stem, roles, alphas, unmatched, meta)
        if group is not None:
            groups.append(group)
    if not groups and not header.tensors:
        raise InvalidFormatError(f"{path}: the file holds no tensors. It is not an adapter: check the file.")
    if not groups and not text_encoder and _looks_like_model(header):
        sample = ", ".join(repr(k) for k in list(header.tensors)[:2])
        raise InvalidFormatError(
            f"{path}: this is a model checkpoint, not an adapter: its {len(header.tensors)} tensors are plain "
            f"weights ({sample}, ...) with no adapter factors (lora_A/lora_down, lokr_w1, hada_w1_a, diff). "
            "Give it as the model instead (`--model` on the command line, the model argument in Python) "
            "and an adapter file (LoRA, LoKr, ...) here."
        )
    return AdapterFile(
        path=path,
        header=header,
        groups=groups,
        unmatched=unmatched,
        format=writers.label(groups, header.metadata, header.tensors.keys()),
        meta=meta,
        ignored=ignored,
    )


def _no_suffix(key: str) -> str:
    form = grammar.unsupported_form(key)
    if form:
        return f"unsupported adapter form: {form}; convert it to LoRA with its trainer, or apply it there"
    return "no known adapter suffix (expected e.g. .lora_A.weight, .lora_down.weight, .lokr_w1, .diff)"


_ALPHA = KeyRole("scale", "alpha")


def _drop_lonely(roles: Roles, unmatched: list[Unmatched]) -> None:
    """A role that counts only beside its companion (`tables.COMPANIONS`: a bare `.weight`) is no
    adapter key without it: reported as any key without a known suffix."""
    for kr in [s for s in roles if s in grammar.COMPANIONS]:
        if KeyRole(kr.family, grammar.COMPANIONS[kr]) not in roles:
            key = roles.pop(kr)
            unmatched.append(Unmatched(key, _no_suffix(key)))


def _choose(header: Header, roles: Roles) -> algorithms.Algorithm | None:
    """The family of the first algorithm (by priority) the roles hold; of the algorithms sharing it,
    the first that claims its shapes, else the first (its shape check then says what is wrong)."""
    families = {kr.family for kr in roles}
    present = [a for a in algorithms.by_priority() if a.family in families]
    if not present:
        return None
    family = present[0].family
    same = [a for a in present if a.family == family]
    if len(same) == 1:
        return same[0]
    shapes = {kr.role: header.tensors[key].shape for kr, key in roles.items() if kr.family == family}
    return next((a for a in same if a.claims is None or a.claims(shapes)), same[0])


def _make_group(
    header: Header,
    prefix: str,
    stem: str,
    roles: Roles,
    alphas: dict[str, float],
    unmatched: list[Unmatched],
    meta: TrainerMeta,
) -> Group | None:
    # A family's roles decide the algorithm, in the registry's priority (factors win over a lone bias diff).
    chosen = _choose(header, roles)
    if chosen is None:
        for key in roles.values():
            unmatched.append(Unmatched(key, "alpha or DoRA magnitude without any adapter weights for this module"))
        return None
    form = meta.peft.unsupported_oft_form() if meta.peft is not None and chosen.family == "oft_r" else None
    if form is not None:  # PEFT options that change how R is built: reported, never applied another way
        form += "; re-save with the defaults (use_cayley_neumann=true, 5 terms, coft=false) or merge it with PEFT"
    elif chosen.unsupported is not None:
        shapes = {kr.role: header.tensors[key].shape for kr, key in roles.items() if kr.family == chosen.family}
        form = chosen.unsupported(shapes)
    if form is not None:
        for key in roles.values():
            unmatched.append(Unmatched(key, f"unsupported adapter form: {form}"))
        return None
    group = Group(prefix=prefix, stem=stem, algorithm=chosen.name)
    algo = chosen.family
    # A file alpha that is a tensor of the algorithm: ComfyUI's OFT/BOFT read it as an absolute bound.
    alpha_role = chosen.alpha_role
    if meta.oft_constraint is OFTConstraint.COMFYUI and chosen.absolute_alpha_role is not None:
        alpha_role = chosen.absolute_alpha_role
    for (family, role), key in roles.items():
        info = header.tensors[key]
        if family == "scale" and alpha_role is not None:  # a tensor of the algorithm, not a scale
            family, role = algo, alpha_role
        if family == algo or (family == "full" and role == "diff_b"):
            if info.dtype not in FLOAT_DTYPES and role not in chosen.value_roles:
                raise InvalidFormatError(
                    f"{header.path}: key '{key}' has dtype {info.dtype}; adapter weights must be floating point."
                )
            group.keys[role] = key
            group.infos[role] = info
        elif family == "scale":
            group.alpha, group.alpha_key = alphas.get(key), key
        elif family == "dora":
            if info.dtype not in FLOAT_DTYPES:
                raise InvalidFormatError(
                    f"{header.path}: key '{key}' has dtype {info.dtype}; a DoRA magnitude must be floating point."
                )
            group.dora_key, group.dora_role = key, role
            group.infos["dora"] = info
        else:
            unmatched.append(
                Unmatched(key, f"{family} tensor beside {algo} tensors for the same module; only {algo} is applied")
            )
    return group


def _read_alphas(header: Header, keys: list[str]) -> dict[str, float]:
    for key in keys:
        info = header.tensors[key]
        if len(info.shape) > 1 or (info.shape and info.shape[0] != 1):
            raise InvalidFormatError(
                f"{header.path}: key '{key}' should be a scalar alpha, found shape {list(info.shape)}."
            )
    # Not checked for NaN/Inf here: an alpha is validated where it enters the math (resolve), since
    # some files carry one that is never used (ai-toolkit's full-factor LoKr saves 9999999999, inf in fp16).
    return {key: float(t.float().reshape(-1)[0]) for key, t in load_tensors(header, keys).items()}


def _looks_like_model(header: Header) -> bool:
    """Most tensors are `<module>.weight` / `<module>.bias` (no adapter role) and some are full-size matrices."""
    keys = [k for k in header.tensors if _bare(grammar.split_role(k))]
    plain = sum(k.endswith((".weight", ".bias")) for k in keys)
    matrices = sum(len(header.tensors[k].shape) == 2 and min(header.tensors[k].shape) > 1 for k in keys)
    return bool(keys) and plain >= 0.9 * len(header.tensors) and matrices > 0


def _bare(split: tuple[str, str, str] | None) -> bool:
    """No adapter role, or one that counts only beside a companion (a bare `.weight`, `tables.COMPANIONS`)."""
    return split is None or KeyRole(split[1], split[2]) in grammar.COMPANIONS
