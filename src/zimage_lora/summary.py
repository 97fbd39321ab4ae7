"""What `inspect` reports about an adapter: format, algorithms, ranks, coverage and memory."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from . import algorithms
from .adapter import Adapter, Target
from .keys import ModuleIndex


def block_type(module: str) -> str:
    """'layers', 'noise_refiner', 'context_refiner' or 'global' (embedders, final layer, ...)."""
    head = module.split(".", 1)[0]
    return head if head in ("layers", "noise_refiner", "context_refiner") else "global"


def layer_kind(module: str) -> str:
    if ".attention." in module:
        return "attention"
    if ".feed_forward." in module:
        return "feed_forward"
    if "adaLN_modulation" in module:
        return "adaLN"
    return "other"


def dynamic_extra_bytes(target: Target) -> int:
    """Memory a target holds when attached dynamically (factors, or the cached delta for LoHa / full)."""
    size = next(iter(target.tensors.values())).element_size()
    t = target.tensors
    n = algorithms.get(target.algorithm).dynamic_numel({k: tuple(v.shape) for k, v in t.items()})
    if "diff_b" in t:
        n += t["diff_b"].numel()
    extra = n * size
    if target.dora is not None:
        extra += 2 * target.dora.magnitude.numel() * 4
    return extra


def factor_shapes(target: Target) -> str:
    """The algorithm's short description of the target's factors, e.g. "kron(60x60, 64x64)"."""
    shapes = {k: tuple(v.shape) for k, v in target.tensors.items() if k != "diff_b"}
    if not shapes:
        return "bias only"
    try:
        return algorithms.get(target.algorithm).describe(shapes)
    except (ValueError, KeyError):  # a report never fails on what validation reports elsewhere
        return ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())


def summarize(adapter: Adapter, index: ModuleIndex) -> dict[str, Any]:
    """A JSON-ready description; `format`, `matched` and `unmatched` are read by outside tools."""
    linear = index.linear_names()
    matched = adapter.modules
    by_block_total = Counter(block_type(m) for m in linear)
    by_block_hit = Counter(block_type(m) for m in set(matched) if m in index.shapes and index.shapes[m].is_linear)
    by_kind_total = Counter(layer_kind(m) for m in linear)
    by_kind_hit = Counter(layer_kind(m) for m in set(matched) if m in index.shapes and index.shapes[m].is_linear)
    ranks = Counter(t.rank for t in adapter.targets if t.rank is not None)
    alphas: Counter[str] = Counter(_num(t.alpha) for t in adapter.targets if t.alpha is not None and t.alpha_used)
    unused = sum(1 for t in adapter.targets if t.alpha is not None and not t.alpha_used)
    if unused:
        alphas["unused"] = unused
    reasons = Counter(_reason_class(u.reason) for u in adapter.unmatched)
    return {
        "name": adapter.name,
        "source": adapter.source,
        "format": adapter.format,
        "algorithms": adapter.algorithms,
        "dora": any(t.dora is not None for t in adapter.targets),
        "dora_orientation": dora_orientation(adapter.targets),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": dict(alphas),
        "scales": sorted({round(t.scale, 6) for t in adapter.targets}),
        "scale_rules": dict(Counter(t.scale_rule for t in adapter.targets if t.scale_rule)),
        "matched": matched,
        "matched_count": len(matched),
        "model_linear_count": len(linear),
        "targets": [
            {"module": t.module, "rows": list(t.rows) if t.rows else None, "algorithm": t.algorithm,
             "factors": factor_shapes(t), "rank": t.rank, "alpha": t.alpha if t.alpha_used else None,
             "alpha_used": t.alpha_used,
             "scale": t.scale, "scale_rule": t.scale_rule, "dora": t.dora is not None,
             "dora_on": None if t.dora is None else ("output rows" if t.dora.on_out else "input columns"),
             "keys": list(t.source_keys)}
            for t in adapter.targets
        ],
        "unmatched": [u.as_dict() for u in adapter.unmatched],
        "ignored": [u.as_dict() for u in adapter.ignored],
        "unmatched_by_reason": dict(reasons),
        "coverage": {
            "by_block": {k: f"{by_block_hit.get(k, 0)}/{v}" for k, v in sorted(by_block_total.items())},
            "by_kind": {k: f"{by_kind_hit.get(k, 0)}/{v}" for k, v in sorted(by_kind_total.items())},
        },
        "adapter_bytes": adapter.nbytes(),
        "dynamic_extra_bytes": sum(dynamic_extra_bytes(t) for t in adapter.targets),
        "notes": list(adapter.notes),
        "metadata": {k: (v if len(v) < 200 else v[:200] + "...") for k, v in adapter.metadata.items()},
    }


def dora_orientation(targets: list[Target]) -> str | None:
    """Where the DoRA magnitude sits: one value per output row (PEFT, LyCORIS default) or per input
    column (LyCORIS wd_on_output=False, OneTrainer's default); None without DoRA."""
    kinds = {t.dora.on_out for t in targets if t.dora is not None}
    if not kinds:
        return None
    if len(kinds) == 2:
        return "mixed (per output row and per input column)"
    return "per output row" if kinds.pop() else "per input column"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _reason_class(reason: str) -> str:
    return re.split(r"[:(']", reason, maxsplit=1)[0].strip()
