"""Resolution: grouped file stems -> `Target`s on the model's modules, validated by shape first and
only then read from disk (only the tensors that will be used)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypedDict

import torch

from .. import algorithms, shapes
from ..adapter import Adapter, Dora, Provenance, Target, Unmatched
from ..errors import IncompatibleWeightsError, InvalidFormatError, LoRAError
from ..formats.reader import AdapterFile, Group
from ..numerics import require_finite
from ..placement import Placement
from .index import ModuleIndex, Site
from .scales import Scale, scale_for, scale_notes

# Lower wins when two stems land on the same rows: the model's own spelling, then an alias, then
# a fused/split translation (mixed files such as F11 carry both).
_PREFERENCE = {("direct", True): 0, ("direct", False): 1, ("rows", False): 2, ("split", False): 2}


@dataclass
class _Placed:
    group: Group
    site: Site
    scale: Scale
    skip: set[str] = field(default_factory=set)  # modules of the site another stem covers instead


class _Common(TypedDict):
    """The fields every Target of one stem shares."""

    algorithm: str
    scale: float
    rank: int | None
    about: Provenance


def resolve(
    file: AdapterFile,
    index: ModuleIndex,
    *,
    name: str,
    strict: bool = False,
    check_finite: bool = True,
    allow_empty: bool = False,
) -> Adapter:
    """Every tensor read is scanned for NaN/Inf here, where it enters (`check_finite=False` skips
    that, for a caller that wants no scan at all). `allow_empty=True` returns an adapter without
    targets (and every key reported) instead of raising when nothing matches: `inspect` shows that report."""
    unmatched = list(file.unmatched)
    placed: list[_Placed] = []
    for group in file.groups:
        site = index.lookup(group.stem)
        if site is None:
            unmatched.extend(
                Unmatched(k, f"no such module '{group.stem}' in the model (after removing prefix '{group.prefix}')")
                for k in group.source_keys
            )
            continue
        _check_shapes(file, group, site, index)
        placed.append(_Placed(group, site, scale_for(file, group)))

    overlap_notes: list[str] = []
    placed, losses = _drop_overlaps(placed, unmatched, overlap_notes, file.path)
    notes = scale_notes(file, [(p.group, p.scale) for p in placed]) + overlap_notes
    if strict and unmatched:
        listing = "; ".join(f"{u.key}: {u.reason}" for u in unmatched[:10])
        more = f" (and {len(unmatched) - 10} more)" if len(unmatched) > 10 else ""
        raise IncompatibleWeightsError(
            f"{file.path}: strict mode and {len(unmatched)} key(s) did not match: {listing}{more}. "
            "Pass strict=False to apply the matched part."
        )
    if not placed and allow_empty:
        return Adapter(name=name, format=file.format, source=str(file.path), targets=[], unmatched=unmatched,
                       metadata=dict(file.header.metadata), notes=notes, ignored=list(file.ignored))
    if not placed:
        sample = ", ".join(repr(g.stem) for g in file.groups[:3]) or "none"
        raise IncompatibleWeightsError(
            f"{file.path}: no key of this {file.format} file matches a module of the model "
            f"({len(file.groups)} adapter stems, e.g. {sample}; {len(unmatched)} keys unmatched). "
            "Is it an adapter for Z-Image's transformer? Run `zimage-lora inspect` to see every key and reason."
        )
    tensors = file.load(sorted({k for p in placed for k in p.group.source_keys}))
    if check_finite:
        # Alphas are checked where they enter the math (scales.py): an unused one may be inf.
        alpha_keys = {p.group.alpha_key for p in placed}
        _check_finite(file, {k: t for k, t in tensors.items() if k not in alpha_keys})
    targets: list[Target] = []
    for p in placed:
        targets.extend(_targets(p, tensors, index))
    if losses:
        _describe_losses(file, index, losses, tensors, unmatched, notes)
    return Adapter(
        name=name,
        format=file.format,
        source=str(file.path),
        targets=targets,
        unmatched=unmatched,
        metadata=dict(file.header.metadata),
        notes=notes,
        ignored=list(file.ignored),
    )


def _expected(site: Site, index: ModuleIndex) -> tuple[tuple[int, ...], bool]:
    shapes = [index.shapes[m] for m in site.modules]
    if site.kind == "rows":
        assert site.rows is not None  # a "rows" site names its rows
        a, b = site.rows
        return (b - a, *shapes[0].shape[1:]), shapes[0].bias
    if site.kind == "split":
        return (sum(s.shape[0] for s in shapes), *shapes[0].shape[1:]), all(s.bias for s in shapes)
    return shapes[0].shape, shapes[0].bias


def _check_shapes(file: AdapterFile, group: Group, site: Site, index: ModuleIndex) -> None:
    """The group's header shapes against the site's modules (the rules are `shapes`'), before any read."""
    want, has_bias = _expected(site, index)
    where = f"{file.path}: key '{next(iter(group.keys.values()))}' -> module '{'/'.join(site.modules)}'"
    found = {r: s for r, s in group.shapes.items() if r != "dora"}
    dora = group.shapes.get("dora")
    if not index.shapes[site.modules[0]].is_linear:
        shapes.check_norm(where, group.algorithm, found, want, dora=dora)
    else:
        shapes.check_delta(where, group.algorithm, found, out_rows=want[0], in_features=want[-1],
                           inconsistent=(InvalidFormatError, " The file is corrupt."))
    _check_size(where, group, want)
    if "diff_b" in found:
        shapes.check_bias(where, found["diff_b"], has_bias=has_bias, want=want[0])
    if dora is not None:
        shapes.check_dora_shape(where, dora, out_rows=want[0], in_features=want[-1])


# Factors may hold at most this many times the values of the dense delta they stand for (plus a floor
# for tiny layers). Real adapters stay far below 1x; a header claiming more (e.g. rank 2**30 in a
# sparse file whose offsets are consistent) is refused before any tensor is read into memory.
_MAX_FACTOR_RATIO = 2
_FACTOR_FLOOR = 1 << 16


def _check_size(where: str, group: Group, want: tuple[int, ...]) -> None:
    held = sum(math.prod(info.shape) for info in group.infos.values())
    dense = math.prod(want)
    if held > _MAX_FACTOR_RATIO * dense + _FACTOR_FLOOR:
        shapes = {r: list(s) for r, s in group.shapes.items()}
        raise IncompatibleWeightsError(
            f"{where}: the {group.algorithm} tensors {shapes} hold {held} values, more than "
            f"{_MAX_FACTOR_RATIO}x the {dense} of the full delta {list(want)} they describe (rank far above the "
            "layer's size). The file is corrupt or hostile; it was not read into memory."
        )


def _drop_overlaps(
    placed: list[_Placed], unmatched: list[Unmatched], notes: list[str], path: object
) -> tuple[list[_Placed], list[tuple[_Placed, _Placed, str]]]:
    """Give each module's rows to one stem. Where two stems overlap, the preferred one takes the
    module and the other keeps the modules nobody else covers (a fused qkv stem beside a split to_q
    still gives to_k and to_v); a stem left with nothing is reported as redundant."""
    claims: dict[str, list[tuple[tuple[int, int] | None, _Placed]]] = {}
    for p in placed:
        for module in p.site.modules:
            claims.setdefault(module, []).append((p.site.rows, p))
    taken_by: dict[tuple[int, str], _Placed] = {}
    for module, entries in claims.items():
        for i, (rows_i, p_i) in enumerate(entries):
            for rows_j, p_j in entries[i + 1:]:
                if module in p_i.skip or module in p_j.skip or not _overlap(rows_i, rows_j):
                    continue
                rank_i = _PREFERENCE[(p_i.site.kind, p_i.site.native)]
                rank_j = _PREFERENCE[(p_j.site.kind, p_j.site.native)]
                if rank_i == rank_j:
                    raise IncompatibleWeightsError(
                        f"{path}: duplicate targets: '{p_i.group.stem}' and '{p_j.group.stem}' (keys "
                        f"'{p_i.group.source_keys[0]}', '{p_j.group.source_keys[0]}') both land on module "
                        f"'{module}'. The file mixes two copies of the same layer; keep one of them."
                    )
                keep, drop = (p_i, p_j) if rank_i < rank_j else (p_j, p_i)
                drop.skip.add(module)
                taken_by[(id(drop), module)] = keep
    dropped: dict[tuple[str, str], list[str]] = {}
    partial: list[tuple[_Placed, list[str]]] = []
    for p in placed:
        if not p.skip:
            continue
        keep = taken_by[(id(p), next(m for m in p.site.modules if m in p.skip))]
        rest = [m for m in p.site.modules if m not in p.skip]
        if rest:
            partial.append((p, rest))
            continue
        dropped.setdefault((_describe(keep.site), _describe(p.site)), []).append(p.group.stem)
        unmatched.extend(
            Unmatched(k, f"redundant: '{keep.group.stem}' already covers these weights") for k in p.group.source_keys
        )
    for (kept, ignored), stems in dropped.items():
        notes.append(
            f"the file carries the same weights twice: used the {kept} keys, ignored the {ignored} keys "
            f"({len(stems)} module(s), e.g. '{stems[0]}')"
        )
    if partial:
        p, rest = partial[0]
        notes.append(
            f"{len(partial)} {_describe(p.site)} stem(s) overlap other keys for part of their modules (e.g. "
            f"'{p.group.stem}': {', '.join(sorted(p.skip))} taken from the other keys); their other parts are "
            f"used ({', '.join(rest)})"
        )
    losses = [(p, taken_by[(id(p), m)], m) for p in placed for m in p.site.modules if m in p.skip]
    return [p for p in placed if not p.skip or any(m not in p.skip for m in p.site.modules)], losses


def _describe_losses(
    file: AdapterFile, index: ModuleIndex, losses: list[tuple[_Placed, _Placed, str]],
    tensors: Mapping[str, torch.Tensor], unmatched: list[Unmatched], notes: list[str],
) -> None:
    """Say whether the keys given up on a module were a copy of the ones used there or another delta
    (the file then carries two versions of those rows): compared on a probe input, never silently."""
    tensors = dict(tensors) | file.load(sorted({k for d, _k, _m in losses for k in d.group.source_keys} - set(tensors)))
    differ: dict[int, bool] = {}
    for drop, keep, module in losses:
        same = _same_effect(drop, keep, module, tensors, index)
        differ[id(drop)] = differ.get(id(drop), False) or same is False
    for i, u in enumerate(unmatched):
        for drop, keep, _m in losses:
            if differ.get(id(drop)) and u.key in drop.group.source_keys and u.reason.startswith("redundant"):
                unmatched[i] = Unmatched(u.key, f"redundant: '{keep.group.stem}' covers the same rows with a "
                                         "different delta (the file carries two versions of them); that one was used")
    stems = sorted({d.group.stem for d, _k, _m in losses if differ[id(d)]})
    if stems:
        # The overlap note said "the same weights twice" before the comparison: not true of these rows.
        notes[:] = [n.replace("carries the same weights twice", "covers the same modules twice") for n in notes]
        notes.append(f"{len(stems)} stem(s) given up where other keys cover the same rows hold a different delta "
                     f"there, not a copy (e.g. '{stems[0]}'): the preferred keys were used for those rows")


def _same_effect(
    a: _Placed, b: _Placed, module: str, tensors: dict[str, torch.Tensor], index: ModuleIndex
) -> bool | None:
    """Whether two stems add the same output on `module`'s shared rows for a probe input (None: not compared)."""
    if not index.shapes[module].is_linear:
        return None
    x = torch.randn(index.shapes[module].shape[1], generator=torch.Generator().manual_seed(0))
    parts = []
    for p in (a, b):
        t = next(t for t in _targets(_Placed(p.group, p.site, p.scale), tensors, index) if t.module == module)
        algo = algorithms.get(t.algorithm)
        if t.dora is not None or algo.needs_weight or not algo.has_weight(t.tensors):
            return None
        y = algorithms.bypass(t.algorithm, x[None], {k: v.float() for k, v in t.tensors.items()})[0] * t.scale
        placement = t.placement(index.shapes[module].shape[0])
        parts.append((placement, placement.take(y)))
    (pa, ya), (pb, yb) = parts
    met = pa.clip(*pb.rows)
    assert met is not None  # the caller passes overlapping pairs
    lo, hi, _d0, _d1 = met
    ya, yb = pa.local(ya, lo, hi), pb.local(yb, lo, hi)
    return bool(torch.allclose(ya, yb, rtol=1e-3, atol=1e-5 * float(ya.abs().max().clamp_min(1e-30))))


def _describe(site: Site) -> str:
    if site.kind == "split":
        return "fused qkv"
    if site.kind == "rows":
        return "split to_q/to_k/to_v"
    return "model-named" if site.native else "alias-named (e.g. 'out', 'x_embedder')"


def _overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    if a is None or b is None:
        return True
    return a[0] < b[1] and b[0] < a[1]


def _check_finite(file: AdapterFile, tensors: dict[str, torch.Tensor]) -> None:
    require_finite(tensors, lambda key, n: (
        f"{file.path}: key '{key}' holds {n} NaN/Inf value(s) out of {tensors[key].numel()}. "
        "The adapter is broken (diverged training or a bad conversion); it was not applied."))


def _targets(p: _Placed, tensors: dict[str, torch.Tensor], index: ModuleIndex) -> list[Target]:
    g, site = p.group, p.site
    own = {role: tensors[key] for role, key in g.keys.items()}
    dora = None
    if g.dora_key is not None:
        mag = tensors[g.dora_key]
        dora = Dora(mag.reshape(-1), on_out=shapes.dora_on_out(tuple(mag.shape)))
    sc = p.scale
    common = _Common(
        algorithm=g.algorithm, scale=sc.scale, rank=sc.rank,
        about=Provenance(source_keys=g.source_keys, alpha=sc.alpha, scale_rule=sc.rule, alpha_used=sc.alpha_used),
    )
    if site.kind == "direct":
        return [Target(module=site.modules[0], tensors=own, dora=dora, **common)]
    if site.kind == "rows":
        return [Target(module=site.modules[0], tensors=own, rows=site.rows, dora=dora, **common)]
    # A fused stem on split layers: an algorithm that can split its tensors exactly (LoRA: rows of up)
    # does; the others keep their factors and take row blocks of the delta they build.
    out: list[Target] = []
    start = 0
    for module in site.modules:
        n = index.shapes[module].shape[0]
        rows = (start, start + n)
        if module in p.skip:
            start += n
            continue
        split = algorithms.get(g.algorithm).split_rows(own, *rows)
        part = dict(own) if split is None else split
        delta_rows = rows if split is None else None
        block = Placement.of(None, rows, n)  # this module's rows of the fused delta
        if "diff_b" in part and delta_rows is None:
            part["diff_b"] = block.take(own["diff_b"])
        part_dora = None
        if dora is not None:
            part_dora = Dora(block.take(dora.magnitude) if dora.on_out else dora.magnitude, dora.on_out)
        out.append(Target(module=module, tensors=part, delta_rows=delta_rows, dora=part_dora, **common))
        start += n
    return out


__all__ = ["resolve", "LoRAError"]
