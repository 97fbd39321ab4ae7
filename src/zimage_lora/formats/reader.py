"""From a safetensors file to `AdapterFile`: keys grouped per module stem, algorithm and alpha known,
tensor data not yet read (only the tiny alpha scalars are)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import Unmatched
from ..errors import InvalidFormatError
from . import grammar
from .safetensors_file import FLOAT_DTYPES, Header, TensorInfo, gc_paused, load_tensors, read_header
from .untrusted import compile_pattern, parse_json


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
    config: dict | None  # PEFT adapter_config.json or diffusers lora_adapter_metadata

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return load_tensors(self.header, keys)


_FAMILY_TO_ALGO = {"lora": "lora", "lokr": "lokr", "loha": "loha", "full": "full"}
# A family's roles decide the algorithm: LoRA/LoKr/LoHa factors win over a lone bias diff.
_PRIORITY = ("lokr", "loha", "lora", "full")


def read_adapter_file(path: str | Path, config: dict | None = None) -> AdapterFile:
    """Group the file's keys; `config` is a PEFT `adapter_config.json` dict when the source had one.

    Linear in the number of keys: a 200,000-key header is read and grouped in 1.7 s of CPU
    (`bench/header.py`); above `MAX_TENSORS` it is refused before parsing.
    """
    with gc_paused():
        return _read_adapter_file(path, config)


def _read_adapter_file(path: str | Path, config: dict | None) -> AdapterFile:
    header = read_header(path)
    path = header.path
    if config is None:
        config = _metadata_config(header)
    unmatched: list[Unmatched] = []
    raw: dict[tuple[str, str], dict[str, tuple[str, str]]] = {}
    for key in header.tensors:
        if grammar.is_text_encoder(key):
            unmatched.append(Unmatched(key, "text-encoder key: this library adapts the transformer only"))
            continue
        split = grammar.split_role(key)  # parse_key without building a ParsedKey: headers can be huge
        if split is None:
            algo = grammar.unsupported_algorithm(key)
            reason = (
                f"unsupported algorithm {algo}: supported are LoRA, LoKr, LoHa, DoRA and full diffs"
                if algo
                else "no known adapter suffix (expected e.g. .lora_A.weight, .lora_down.weight, .lokr_w1, .diff)"
            )
            unmatched.append(Unmatched(key, reason))
            continue
        stem, family, role = split
        roles = raw.setdefault(grammar.strip_prefix(stem), {})
        slot = f"{family}:{role}"
        if slot in roles:
            unmatched.append(Unmatched(key, f"duplicate of '{roles[slot][1]}' (same module and role); ignored"))
            continue
        roles[slot] = (role, key)

    groups: list[Group] = []
    alpha_tensors = [roles["scale:alpha"][1] for roles in raw.values() if "scale:alpha" in roles]
    alphas = _read_alphas(header, alpha_tensors)
    for (prefix, stem), roles in raw.items():
        group = _make_group(header, prefix, stem, roles, alphas, unmatched)
        if group is not None:
            groups.append(group)
    if not groups and not header.tensors:
        raise InvalidFormatError(f"{path}: the file holds no tensors. It is not an adapter: check the file.")
    return AdapterFile(
        path=path,
        header=header,
        groups=groups,
        unmatched=unmatched,
        format=_format_label(groups, header),
        config=config,
    )


def _make_group(
    header: Header,
    prefix: str,
    stem: str,
    roles: dict[str, tuple[str, str]],
    alphas: dict[str, float],
    unmatched: list[Unmatched],
) -> Group | None:
    families = {slot.split(":")[0] for slot in roles}
    algo = next((a for a in _PRIORITY if a in families), None)
    if algo is None:
        for _role, key in roles.values():
            unmatched.append(Unmatched(key, "alpha or DoRA magnitude without any adapter weights for this module"))
        return None
    group = Group(prefix=prefix, stem=stem, algorithm=_FAMILY_TO_ALGO[algo])
    for slot, (role, key) in roles.items():
        family = slot.split(":")[0]
        info = header.tensors[key]
        if family == algo or (family == "full" and role == "diff_b"):
            if info.dtype not in FLOAT_DTYPES:
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
    out: dict[str, float] = {}
    for key, tensor in load_tensors(header, keys).items():
        value = float(tensor.float().reshape(-1)[0])
        if not torch.isfinite(torch.tensor(value)):
            raise InvalidFormatError(f"{header.path}: alpha '{key}' is {value}; expected a finite number.")
        out[key] = value
    return out


def _metadata_config(header: Header) -> dict | None:
    """diffusers' `lora_adapter_metadata` (PEFT-config JSON) or kohya's `ss_network_*` fields."""
    meta = header.metadata
    text = meta.get("lora_adapter_metadata")
    if text:
        doc = parse_json(text, header.path, what="metadata 'lora_adapter_metadata'", fix="Re-save the adapter.")
        # diffusers may nest per component: {"transformer": {...}} or prefix keys "transformer.r"
        if isinstance(doc, dict) and isinstance(doc.get("transformer"), dict):
            doc = doc["transformer"]
        if isinstance(doc, dict):
            doc = {k.removeprefix("transformer."): v for k, v in doc.items()}
            return doc
    if "ss_network_alpha" in meta:
        try:
            alpha = float(meta["ss_network_alpha"])
        except ValueError:
            return None
        if not math.isfinite(alpha):
            raise InvalidFormatError(
                f"{header.path}: metadata 'ss_network_alpha' is {meta['ss_network_alpha']!r}; expected a finite "
                "number. Fix the metadata or add per-module '.alpha' tensors."
            )
        return {"kohya_alpha": alpha, "kohya_dim": meta.get("ss_network_dim")}
    return None


_LITERAL_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


def pattern_value(patterns: dict, stem: str, source: object = "adapter config"):
    """PEFT's rank/alpha pattern lookup: a pattern matches a module name ending with it.

    Patterns come from the file, so they are untrusted: plain names are compared as text, and real
    regular expressions run on the `regex` engine (a diffusers dependency) with a time limit, since a
    pattern like '(.*)*(.*)*Z' would freeze Python's `re` for hours.
    """
    if not isinstance(patterns, dict):
        kind = type(patterns).__name__
        raise InvalidFormatError(f"{source}: alpha/rank pattern must be a JSON object, found {kind}.")
    for pattern, value in patterns.items():
        if _LITERAL_PATTERN.match(pattern):
            if stem == pattern or stem.endswith("." + pattern):
                return value
            continue
        compiled = compile_pattern(pattern, source)
        try:
            if compiled.match(stem, timeout=1.0):
                return value
        except (TimeoutError, RecursionError) as exc:
            raise InvalidFormatError(
                f"{source}: pattern {pattern[:100]!r} cannot be used ({exc}). Fix 'alpha_pattern' in the config."
            ) from None
    return None


def _format_label(groups: list[Group], header: Header) -> str:
    prefixes = {g.prefix for g in groups}
    algos = {g.algorithm for g in groups}
    keys = header.tensors.keys()
    fused = any(g.stem.endswith(("qkv", "attention.out", "attention_out")) for g in groups)
    split = any(re.search(r"to[._](q|k|v|out)", g.stem) for g in groups)
    if fused and split:
        return "mixed (split and fused qkv)"
    if "lycoris_" in prefixes:
        return "lycoris"
    if "lora_unet_" in prefixes or "lora_transformer_" in prefixes:
        return "kohya (fused qkv)" if fused else "kohya"
    if any(p.startswith("base_model.model.") for p in prefixes):
        return "peft"
    if "diffusion_model." in prefixes or "model.diffusion_model." in prefixes:
        if algos & {"lokr", "loha"}:
            return "ai-toolkit (lycoris)"
        if fused:
            return "comfyui (fused qkv)"
        if any(k.endswith(".lora_down.weight") for k in keys) or any(g.alpha is not None for g in groups):
            return "comfyui"
        return "ai-toolkit"
    if "transformer." in prefixes:
        if any(k.endswith(".lora_down.weight") for k in keys):
            return "onetrainer (legacy)"
        return "diffusers"
    if any(".default." in k or k.endswith(".default") for k in keys):
        return "diffsynth"
    if any(g.alpha is not None for g in groups):
        return "onetrainer"
    return "bare module names"
