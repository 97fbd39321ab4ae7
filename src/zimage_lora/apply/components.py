"""What a public call works on: a list of components. A bare model is a list of one (the transformer); a
Z-Image pipeline with a text encoder is two, its `transformer` and its `text_encoder`. Every change of the
engine runs over that list inside one scope (`apply.access.Scope`), so a pipeline is never a second engine.

Every Z-Image pipeline (text-to-image, img2img, inpaint, the two ControlNet ones, Omni) carries
`transformer` and `text_encoder`; other components (ControlNet, SigLIP, VAE) are never adapted. One
adapter name covers every component it landed on: it is applied, re-weighted, switched and removed on
all of them together. This module also reads one file into each component's part.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter import Adapter, Unmatched
from ..errors import IncompatibleWeightsError, _LegacyArgumentError
from ..formats import text_encoder as te_keys
from ..formats.reader import read_adapter_file
from ..keys import ModuleIndex, resolve
from ..keys.text_encoder import TextEncoderIndex
from ..loading import load_adapter
from ..mlx import is_mlx
from ..sources import LoRAConfiguration, resolve_source
from .report import AdapterInfo, ApplyReport

#: diffusers' Z-Image pipelines (0.42.1): each has `transformer` and `text_encoder`.
PIPELINE_CLASSES = (
    "ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline", "ZImageControlNetPipeline",
    "ZImageControlNetInpaintPipeline", "ZImageOmniPipeline",
)
TRANSFORMER, TEXT_ENCODER = "transformer", "text_encoder"
_LABELS = {TRANSFORMER: "transformer", TEXT_ENCODER: "text encoder"}


@dataclass(frozen=True)
class Component:
    """One adaptable module of what the caller passed: `part` names it (`transformer`, `text_encoder`)."""

    part: str
    module: nn.Module

    @property
    def prefix(self) -> str:
        """How a report names this component's modules among a pipeline's: none for the transformer."""
        return "" if self.part == TRANSFORMER else self.part + "."


def components_of(obj: Any) -> list[Component]:
    """The components a call on `obj` covers, the transformer first (the order locks are taken in, so
    two changes cannot wait on each other). A pipeline without a text encoder is its transformer alone
    (the engine then reports the file's text-encoder keys as unmatched)."""
    if isinstance(obj, nn.Module) or is_mlx(obj):  # an MLX model is its own engine's (apply/engine.py)
        return [Component(TRANSFORMER, obj)]
    transformer, text_encoder = getattr(obj, TRANSFORMER, None), getattr(obj, TEXT_ENCODER, None)
    if not isinstance(transformer, nn.Module):
        raise _LegacyArgumentError(
            f"expected a torch.nn.Module (the Z-Image transformer) or a pipeline, got {type(obj)}"
        )
    if isinstance(text_encoder, nn.Module):
        return [Component(TRANSFORMER, transformer), Component(TEXT_ENCODER, text_encoder)]
    return [Component(TRANSFORMER, transformer)]


def is_pipeline(parts: list[Component]) -> bool:
    """Reports and listings over several components name each component (`parts`, `components`)."""
    return len(parts) > 1


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
def load_parts(
    parts: list[Component], source: str | Path | LoRAConfiguration, *, name: str | None,
    filename: str | None, strict: bool,
) -> tuple[dict[str, Adapter], list[Unmatched]]:
    """Each component's part of one file resolved against that component, and the keys no part took.
    Nothing matching anywhere is an error; a part that matches nothing is not. `name`: the adapter's
    name when the caller gave one (else the source's)."""
    if not is_pipeline(parts):
        return {TRANSFORMER: load_adapter(source, parts[0].module, name=name, filename=filename, strict=strict)}, []
    cfg = source if isinstance(source, LoRAConfiguration) else LoRAConfiguration(source)
    if filename is not None:
        cfg.filename = filename
    resolved = resolve_source(cfg)
    name = name or cfg.name or resolved.default_name
    adapters: dict[str, Adapter] = {}
    left: list[Unmatched] = []
    for c in parts:
        file = read_adapter_file(resolved.path, resolved.config if c.part == TRANSFORMER else None, component=c.part)
        # The transformer's read reports the text-encoder keys; here the text encoder's read takes them.
        file.unmatched = [u for u in file.unmatched if u.reason != te_keys.TRANSFORMER_ONLY_REASON]
        index = TextEncoderIndex(c.module) if c.part == TEXT_ENCODER else ModuleIndex(c.module)
        if not any(index.lookup(g.stem) is not None for g in file.groups):
            left += file.unmatched
            left += [
                Unmatched(k, f"no such module '{g.stem}' in the {_LABELS[c.part]} (after removing prefix '{g.prefix}')")
                for g in file.groups for k in g.source_keys
            ]
            continue
        adapter = resolve(file, index, name=name, strict=False)  # scans what it reads for NaN/Inf
        if c.part == TEXT_ENCODER:
            adapter.format = te_keys.format_label({g.prefix for g in file.groups})
        adapters[c.part] = adapter
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
    return adapters, left


def _listing(unmatched: list[Unmatched]) -> str:
    more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
    return "; ".join(f"{u.key}: {u.reason}" for u in unmatched[:10]) + more


# -- reports over several components -----------------------------------------------------------------
def pipeline_report(reports: dict[str, ApplyReport], left: list[Unmatched]) -> PipelineReport:
    """One report for an apply over a pipeline, from each component's own."""
    tr, te = reports.get(TRANSFORMER), reports.get(TEXT_ENCODER)
    first = tr or te
    assert first is not None  # an apply reports on at least one component
    prefix = TEXT_ENCODER + "."
    out = PipelineReport(
        name=first.name, mode=first.mode, scale=first.scale, source=first.source,
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
        renamed_from=first.renamed_from,
        parts=dict(reports),
    )
    counts = ", ".join(f"{_LABELS[p]}: {len(r.applied)} target(s)" for p, r in reports.items())
    out.notes.append(f"applied to the pipeline's {counts}")
    return out


def pipeline_infos(listed: list[tuple[str, AdapterInfo]]) -> list[AdapterInfo]:
    """One entry per adapter name over a pipeline's components (`listed`: (part, info) in part order)."""
    merged: dict[str, list[tuple[str, AdapterInfo]]] = {}
    for part, info in listed:
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
