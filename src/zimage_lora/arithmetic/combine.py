"""`combine`: several adapters (each at a strength) into one LoRA file.

concat (the default): the LoRA factors stacked, strengths folded into the ups; applying the result is
applying the inputs together, exactly (rank = the sum). With a rank rule (`rank`, `energy`) the summed
delta is truncated to its best approximation of that rank (Eckart-Young), from the factors when every
part of a module is a LoRA (`lowrank.from_factors`), else from the dense delta one module at a time.
ties / dare / dare_ties merge each module's dense task vectors (`merging.py`), then truncate (default
rank: the largest input rank, as PEFT does). Biases and norm diffs are summed at their strengths.
DoRA, OFT, BOFT, GLoRA and IA3 inputs need the base weights (`model`: a checkpoint or a torch model
with its weights, `base.py`); each module's dense delta is built, used and dropped in turn.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, Provenance, Target
from ..errors import InvalidArgumentError, UnsupportedError
from ..keys import ModuleIndex
from ..numerics import one_thread, require_finite
from . import lowrank, ranks
from .base import BaseWeights, base_weights, require
from .common import Input, Source, metadata_json, module_index, out_dtype, progress, read_input
from .merging import METHODS, combine_dense
from .shares import Share, add_target, weight_dependent, weighted_sum

COMBINE_METHODS = ("concat", *METHODS)


@dataclass
class ArithmeticReport:
    """What was done: inputs, rule, and the error per module (relative Frobenius norm of the lost part)."""

    operation: str
    inputs: list[dict[str, Any]]
    method: str
    rule: dict[str, Any]
    modules: list[dict[str, Any]] = field(default_factory=list)  # {"module", "rank", "error"}
    lost: float = 0.0  # sum over modules of ||lost||^2
    total: float = 0.0  # sum over modules of ||delta||^2
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    out: str = ""
    bytes_before: int = 0
    bytes_after: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> float:
        """The relative error over every module together."""
        return math.sqrt(self.lost / self.total) if self.total > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"operation": self.operation, "inputs": self.inputs, "method": self.method, "rule": self.rule,
                "error": self.error, "modules": self.modules, "notes": self.notes, "seconds": self.seconds,
                "out": self.out, "bytes_before": self.bytes_before, "bytes_after": self.bytes_after, **self.extra}

    def metadata(self) -> dict[str, str]:
        doc = {k: v for k, v in self.as_dict().items() if k not in ("modules", "out", "seconds")}
        return {"zimage_lora_arithmetic": metadata_json(doc),
                "zimage_lora_errors": metadata_json({m["module"]: round(m["error"], 6) for m in self.modules})}


def combine(
    inputs: Sequence[Source],
    *,
    method: str = "concat",
    rank: int | None = None,
    energy: float | None = None,
    density: float | None = None,
    seed: int = 0,
    model: str | Path | torch.nn.Module | ModuleIndex | None = None,
    dtype: str | torch.dtype | None = None,
    name: str = "combined",
) -> Adapter:
    """One LoRA `Adapter` from `inputs` (each "SOURCE[:S]", (source, strength), a LoRAConfiguration or an
    Adapter), resolved against `model` (default: the Z-Image-Turbo inventory; a torch model with its
    weights or a checkpoint also gives DoRA / OFT / BOFT / GLoRA / IA3 inputs their base). Its `metadata` records the
    inputs (file, sha256, strength), the method, the rank rule and the error per module and in total."""
    return combine_report(inputs, method=method, rank=rank, energy=energy, density=density, seed=seed,
                          model=model, dtype=dtype, name=name)[0]


def combine_report(inputs: Sequence[Source], *, method: str = "concat", rank: int | None = None,
                   energy: float | None = None, density: float | None = None, seed: int = 0,
                   model: str | Path | torch.nn.Module | ModuleIndex | None = None,
                   dtype: str | torch.dtype | None = None,
                   name: str = "combined", show_progress: bool = False) -> tuple[Adapter, ArithmeticReport]:
    started = time.perf_counter()
    if method not in COMBINE_METHODS:
        raise InvalidArgumentError(f"unknown method {method!r}; choose one of {', '.join(COMBINE_METHODS)}.")
    if not inputs:
        raise InvalidArgumentError("nothing to combine: give at least one adapter.")
    rule = ranks.rule(rank=rank, energy=energy)
    if method == "concat" and density is not None:
        raise InvalidArgumentError("--density belongs to ties, dare and dare_ties; concat keeps every value.")
    if method != "concat":
        density = 1.0 if density is None else density
        if not 0 < density <= 1:
            raise InvalidArgumentError(f"density must be in (0, 1], got {density!r}.")
    index = module_index(model)
    with one_thread():  # many small tensors: one thread beats two contending ones (see numerics.one_thread)
        loaded = [read_input(spec, index) for spec in inputs]
    report = ArithmeticReport("combine", [i.record() for i in loaded], method, rule.as_dict())
    report.extra = {"density": density, "seed": seed} if method != "concat" else {}
    if method != "concat" and not rule.given:
        rule = ranks.rule(rank=_default_rank(loaded))
        report.rule = rule.as_dict()
    adapter = build(loaded, index, method, rule, density or 1.0, seed, dtype, name, report, show_progress,
                    base=base_weights(model))
    report.bytes_after = adapter.nbytes()
    report.seconds = time.perf_counter() - started
    adapter.metadata = report.metadata()
    return adapter, report


def _default_rank(loaded: list[Input]) -> int:
    found = [t.rank for i in loaded for t in i.adapter.targets if t.algorithm == "lora" and t.rank]
    if not found:
        raise InvalidArgumentError("the inputs hold no LoRA rank to default to; give --rank R or --energy E.")
    return max(found)


Parts = list[tuple[list[Target], float, str]]  # per input touching a module: (its targets, strength, file)


def parts_of(loaded: list[Input], index: ModuleIndex, base: BaseWeights | None = None) -> dict[str, Parts]:
    """module -> the inputs' targets on it, in the model's module order. A weight-dependent target
    without base weights is refused here, before any work."""
    by_module: dict[str, Parts] = {}
    for inp in loaded:
        mine: dict[str, list[Target]] = {}
        for t in inp.adapter.targets:
            what = weight_dependent(t)
            if what is not None:
                require(base, inp.file, t.label, what)
            mine.setdefault(t.module, []).append(t)
        for module, targets in mine.items():
            by_module.setdefault(module, []).append((targets, inp.strength, inp.file))
    order = {m: i for i, m in enumerate(index.shapes)}
    return dict(sorted(by_module.items(), key=lambda kv: order.get(kv[0], len(order))))


def shares_of(module: str, parts: Parts, index: ModuleIndex, base: BaseWeights | None) -> list[tuple[Share, float]]:
    """One module's [(share, strength)] per input: built when the module's turn comes, dropped after."""
    out = []
    for targets, strength, source in parts:
        share = Share(source=source)
        for t in targets:
            add_target(share, t, index.shapes[module], base)
        out.append((share, strength))
    return out


def build(loaded: list[Input], index: ModuleIndex, method: str, rule: ranks.RankRule, density: float, seed: int,
          dtype: str | torch.dtype | None, name: str, report: ArithmeticReport, show_progress: bool = False, *,
          base: BaseWeights | None = None) -> Adapter:
    dt = out_dtype(dtype, [v for i in loaded for t in i.adapter.targets for v in t.tensors.values()])
    generator = torch.Generator().manual_seed(seed)
    targets: list[Target] = []
    by_module = parts_of(loaded, index, base)
    for inp in loaded:
        if inp.strength == 0:
            report.notes.append(f"{inp.file}: strength 0 adds nothing.")
    with progress(show_progress, len(by_module), report.operation) as step:
        for module, parts in by_module.items():
            shape = index.shapes[module].shape
            shares = shares_of(module, parts, index, base)
            summed = weighted_sum(shares, shape)
            if len(shape) == 1:  # a norm's weight: its diffs add
                if summed.dense is not None:
                    targets.append(Target(module, "full", {"diff": summed.dense.to(dt)}))
            elif any(s.has_weight for s, _ in shares):
                target = _weight_target(module, shape, shares, summed, method, rule, density, generator, dt, report)
                if target is not None:
                    targets.append(target)
            if summed.bias is not None:
                _put_bias(targets, module, summed.bias.to(dt))
            step()
    for t in targets:  # strengths near float32's limit can overflow a sum, or the output dtype
        def message(role: str, n: int, t: Target = t) -> str:
            return (f"{report.operation}: module {t.module} ({role}) would hold {n} non-finite values in {dt}; "
                    "lower the strengths or write --dtype fp32.")

        require_finite(t.tensors, message)
    if not targets:
        raise UnsupportedError(f"{report.operation}: the result is empty (every delta is zero).")
    return Adapter(name=name, format=report.operation, source="", targets=targets)


def _weight_target(module: str, shape: tuple[int, ...], shares: list[tuple[Share, float]], summed: Share,
                   method: str, rule: ranks.RankRule, density: float, generator: torch.Generator, dt: torch.dtype,
                   report: ArithmeticReport) -> Target | None:
    if method == "concat" and not rule.given:
        if not summed.factored:
            culprit = next(s for s, _ in shares if not s.factored)
            raise UnsupportedError(
                f"module {module}: input {culprit.source} is not a LoRA there (LoKr, LoHa, a full diff, or a "
                "delta of the base weight), so stacking factors cannot hold it exactly. Give --rank R or --energy E "
                "to write the best LoRA of that rank of the summed delta."
            )
        up, down = summed.up(), summed.down()
        report.modules.append({"module": module, "rank": up.shape[1], "error": 0.0})
        return _lora(module, up, down, dt)
    if method == "concat":
        trunc = (lowrank.from_factors(summed.up(), summed.down(), rule) if summed.factored
                 else lowrank.from_dense(summed.matrix(shape), rule))
    else:
        tasks = [s.matrix(shape) for s, _ in shares]
        merged = combine_dense(method, tasks, [st for _, st in shares], density, generator)
        trunc = lowrank.from_dense(merged, rule)
    report.modules.append({"module": module, "rank": trunc.rank, "error": trunc.rel_error})
    report.lost += trunc.lost
    report.total += trunc.total
    if trunc.rank == 0:
        report.notes.append(f"module {module}: the delta is zero; left out.")
        return None
    return _lora(module, trunc.up, trunc.down, dt)


def _lora(module: str, up: torch.Tensor, down: torch.Tensor, dt: torch.dtype) -> Target:
    r = down.shape[0]
    return Target(module, "lora", {"down": down.to(dt).contiguous(), "up": up.to(dt).contiguous()},
                  scale=1.0, rank=r, about=Provenance(alpha=float(r), scale_rule="alpha = rank (written by combine)"))


def _put_bias(targets: list[Target], module: str, bias: torch.Tensor) -> None:
    if targets and targets[-1].module == module and targets[-1].algorithm == "lora":
        targets[-1].tensors["diff_b"] = bias
    else:
        targets.append(Target(module, "full", {"diff_b": bias}))
