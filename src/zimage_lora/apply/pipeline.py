"""Adapters on a whole pipeline: the transformer part of a file on `pipe.transformer`, its text-encoder
part on `pipe.text_encoder`, with the engine's own apply / remove / re-weight / switch on each.

Every Z-Image pipeline (text-to-image, img2img, inpaint, the two ControlNet ones, Omni) carries
`transformer` and `text_encoder`; other components (ControlNet, SigLIP, VAE) are never adapted.
One adapter name covers both components: it is applied, re-weighted, switched and removed on both.
Each component keeps its own engine state and lock, so a forward pass of one component sees its
adapters before or after a change; a change to the pipeline as a whole is not one atomic step for
a forward pass running at the same time on the other component.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter, Unmatched
from ..blocks import default_of
from ..errors import IncompatibleWeightsError, LoRAError
from ..formats import text_encoder as te_keys
from ..formats.reader import read_adapter_file
from ..keys import ModuleIndex, resolve
from ..keys.text_encoder import TextEncoderIndex
from ..sources import LoRAConfiguration, resolve_source
from . import blockwise, engine
from .access import _locked
from .report import AdapterInfo, ApplyReport
from .transaction import change
from .validate import check_compute_dtype, check_mode, check_name, check_names, check_weights, plan

#: diffusers' Z-Image pipelines (0.42.1): each has `transformer` and `text_encoder`.
PIPELINE_CLASSES = (
    "ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageControlNetPipeline",
    "ZImageControlNetInpaintPipeline", "ZImageOmniPipeline",
)
TRANSFORMER, TEXT_ENCODER = "transformer", "text_encoder"
_LABELS = {TRANSFORMER: "transformer", TEXT_ENCODER: "text encoder"}


def components(obj: Any) -> dict[str, nn.Module] | None:
    """A pipeline's adaptable components, or None when `obj` is a bare model or a pipeline without a
    text encoder (the engine then adapts the transformer alone and reports text-encoder keys)."""
    if isinstance(obj, nn.Module):
        return None
    transformer, text_encoder = getattr(obj, TRANSFORMER, None), getattr(obj, TEXT_ENCODER, None)
    if isinstance(transformer, nn.Module) and isinstance(text_encoder, nn.Module):
        return {TRANSFORMER: transformer, TEXT_ENCODER: text_encoder}
    return None


@dataclass
class PipelineReport(ApplyReport):
    """`ApplyReport` over a pipeline. `applied`: transformer modules by their own names (as for a bare
    transformer), text-encoder modules as `text_encoder.<name>`; `parts`: each component's own report."""

    parts: dict[str, ApplyReport] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineAdapterInfo(AdapterInfo):
    """`AdapterInfo` over a pipeline: `modules` counts both components; `components` names them."""

    components: tuple[str, ...] = ()


# -- loading -----------------------------------------------------------------------------------------
def _index(part: str, module: nn.Module) -> ModuleIndex:
    return TextEncoderIndex(module) if part == TEXT_ENCODER else ModuleIndex(module)


def load_parts(
    parts: dict[str, nn.Module], source: str | Path | LoRAConfiguration, *, name: str | None,
    filename: str | None, strict: bool,
) -> tuple[dict[str, Adapter], list[Unmatched], str]:
    """Each component's part of one file resolved against that component, the keys no part took,
    and the adapter name. Nothing matching anywhere is an error; a part that matches nothing is not."""
    cfg = source if isinstance(source, LoRAConfiguration) else LoRAConfiguration(source)
    if filename is not None:
        cfg.filename = filename
    resolved = resolve_source(cfg)
    name = name or cfg.name or resolved.default_name
    adapters: dict[str, Adapter] = {}
    left: list[Unmatched] = []
    for part, module in parts.items():
        file = read_adapter_file(resolved.path, resolved.config if part == TRANSFORMER else None, component=part)
        # The transformer's read reports the text-encoder keys; here the text encoder's read takes them.
        file.unmatched = [u for u in file.unmatched if u.reason != te_keys.TRANSFORMER_ONLY_REASON]
        index = _index(part, module)
        if not any(index.lookup(g.stem) is not None for g in file.groups):
            left += file.unmatched
            left += [
                Unmatched(k, f"no such module '{g.stem}' in the {_LABELS[part]} (after removing prefix '{g.prefix}')")
                for g in file.groups for k in g.source_keys
            ]
            continue
        adapter = resolve(file, index, name=name, strict=False)  # scans what it reads for NaN/Inf
        if part == TEXT_ENCODER:
            adapter.format = te_keys.format_label({g.prefix for g in file.groups})
        adapters[part] = adapter
    unmatched = [u for a in adapters.values() for u in a.unmatched] + left
    if not adapters:
        raise IncompatibleWeightsError(
            f"{resolved.path}: no key matches a module of the pipeline's transformer or text encoder "
            f"({len(unmatched)} keys, e.g. {_listing(unmatched)}). Is it a Z-Image adapter? "
            "`zimage-lora inspect` lists every key with its reason."
        )
    if strict and unmatched:
        raise IncompatibleWeightsError(
            f"{resolved.path}: strict mode and {len(unmatched)} key(s) did not match: {_listing(unmatched)}. "
            "Pass strict=False to apply the matched part."
        )
    return adapters, left, name


def _listing(unmatched: list[Unmatched]) -> str:
    more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
    return "; ".join(f"{u.key}: {u.reason}" for u in unmatched[:10]) + more


# -- apply -------------------------------------------------------------------------------------------
def apply(
    pipe: Any, source: Any, *, scale: float, mode: str, name: str | None, filename: str | None, strict: bool,
    compute_dtype: torch.dtype | None,
) -> ApplyReport:
    parts = components(pipe)
    if isinstance(source, Adapter):  # resolved against one model already: the transformer's
        return engine.apply_adapter(
            parts[TRANSFORMER], source, scale=scale, mode=mode, name=name, strict=strict, compute_dtype=compute_dtype
        )
    mode = check_mode(mode)
    strength = blockwise.check_strength(scale)
    compute_dtype = check_compute_dtype(compute_dtype)
    if isinstance(source, LoRAConfiguration):
        strength = blockwise.scaled(strength, source.scale)
    if name is not None:
        check_name(name)
    adapters, left, name = load_parts(parts, source, name=name, filename=filename, strict=strict)
    # Every part is validated before either component changes (the loader scanned the tensors already).
    planned = {part: plan(parts[part], adapters[part], mode, scan=False) for part in adapters}
    reports: dict[str, ApplyReport] = {}
    held = {part: engine.attached(module, name) is not None for part, module in parts.items()}
    # One transaction per component, both open until every part is attached: an error in either
    # (e.g. memory, past validation) rolls both back, each by its own transaction. Locks are always
    # taken transformer first, so two pipeline changes cannot wait on each other.
    with ExitStack() as stack:
        txns = {}
        for part in (TRANSFORMER, TEXT_ENCODER):
            if part in adapters:
                state = stack.enter_context(_locked(parts[part], create=True))
                txns[part] = stack.enter_context(change(parts[part], state))
        for part, txn in txns.items():
            reports[part] = engine.attach(txn, adapters[part], planned[part], name, mode, _part(strength, part,
                                          parts[part], adapters[part]), compute_dtype)
    for part, module in parts.items():  # the name now means this file: an older part elsewhere goes
        if part not in adapters and held[part]:
            engine.remove_adapter(module, name)
    for report in reports.values():
        engine.warn_requant(report, stacklevel=4)  # the caller of apply_adapter
    return _merge_reports(reports, left, name, mode, default_of(strength))


def _part(strength: Any, part: str, module: nn.Module, adapter: Adapter) -> Any:
    """A per-block strength's patterns name transformer modules: the text encoder takes its default."""
    if part == TRANSFORMER:
        return blockwise.resolve_for(module, adapter, strength)
    return default_of(strength)


def _merge_reports(
    reports: dict[str, ApplyReport], left: list[Unmatched], name: str, mode: str, strength: float
) -> PipelineReport:
    tr, te = reports.get(TRANSFORMER), reports.get(TEXT_ENCODER)
    first = tr or te
    prefix = TEXT_ENCODER + "."
    out = PipelineReport(
        name=name, mode=mode, scale=strength, source=first.source,
        format=" + ".join(r.format for r in reports.values()),
        applied=(tr.applied if tr else []) + [prefix + a for a in (te.applied if te else [])],
        unmatched=[u for r in reports.values() for u in r.unmatched] + left,
        requant_loss={
            **(tr.requant_loss if tr else {}),
            **{prefix + k: v for k, v in (te.requant_loss if te else {}).items()},
        },
        notes=(tr.notes if tr else []) + [f"text encoder: {n}" for n in (te.notes if te else [])],
        replaced=any(r.replaced for r in reports.values()),
        hotswapped=all(r.hotswapped for r in reports.values()),
        parts=dict(reports),
    )
    counts = ", ".join(f"{_LABELS[p]}: {len(r.applied)} target(s)" for p, r in reports.items())
    out.notes.append(f"applied to the pipeline's {counts}")
    return out


# -- everything else, over the components holding each name ---------------------------------------------
def _holders(parts: dict[str, nn.Module], name: str) -> dict[str, nn.Module]:
    return {p: m for p, m in parts.items() if engine.attached(m, name) is not None}


def _attached_names(parts: dict[str, nn.Module]) -> list[str]:
    return list(dict.fromkeys(a.name for m in parts.values() for a in engine.list_adapters(m)))


def _no_such(name: str, parts: dict[str, nn.Module]) -> LoRAError:
    return LoRAError(f"no adapter named '{name}' is attached; attached: {_attached_names(parts) or 'none'}.")


def remove(pipe: Any, name: str | None) -> list[str]:
    parts = components(pipe)
    holders = parts if name is None else _holders(parts, name)
    if name is not None and not holders:
        raise _no_such(name, parts)
    removed: list[str] = []
    for module in holders.values():
        removed += engine.remove_adapter(module, name)
    return list(dict.fromkeys(removed))


def set_scale(pipe: Any, name: str, scale: float) -> None:
    parts = components(pipe)
    check_name(name)
    blockwise.check_strength(scale)
    holders = _holders(parts, name)
    if not holders:
        raise _no_such(name, parts)
    for part, module in holders.items():
        engine.set_adapter_scale(module, name, scale if part == TRANSFORMER else default_of(scale))


def set_active(pipe: Any, names: list[str] | None, weights: list[float] | None) -> None:
    parts = components(pipe)
    attached = _attached_names(parts)
    wanted = attached if names is None else check_names(names)
    values = check_weights(weights, wanted)
    unknown = [n for n in wanted if n not in attached]
    if unknown:
        raise LoRAError(f"no adapter named {unknown} is attached; attached: {attached or 'none'}.")
    for module in parts.values():
        here = {a.name for a in engine.list_adapters(module)}
        keep = [i for i, n in enumerate(wanted) if n in here]
        engine.set_active_adapters(module, [wanted[i] for i in keep], None if values is None else [
            values[i] if module is parts[TRANSFORMER] else default_of(values[i]) for i in keep])


def list_all(pipe: Any) -> list[AdapterInfo]:
    merged: dict[str, list[tuple[str, AdapterInfo]]] = {}
    for part, module in components(pipe).items():
        for info in engine.list_adapters(module):
            merged.setdefault(info.name, []).append((part, info))
    out: list[AdapterInfo] = []
    for name, entries in merged.items():
        first = entries[0][1]
        out.append(PipelineAdapterInfo(
            name=name, mode=first.mode, scale=first.scale, source=first.source,
            format=" + ".join(i.format for _, i in entries), modules=sum(i.modules for _, i in entries),
            algorithms=tuple(sorted({a for _, i in entries for a in i.algorithms})), active=first.active,
            components=tuple(p for p, _ in entries),
        ))
    return out


def switch_mode(pipe: Any, names: str | list[str] | None, mode: str) -> None:
    """`Adapters.fuse` / `unfuse` on a pipeline: the same switch on each component holding the name."""
    parts = components(pipe)
    attached = _attached_names(parts)
    wanted = attached if names is None else ([names] if isinstance(names, str) else list(names))
    for name in wanted:
        if name not in attached:
            raise _no_such(name, parts)
    for module in parts.values():
        here = {a.name for a in engine.list_adapters(module)}
        engine.switch_mode(module, [n for n in wanted if n in here], mode)
