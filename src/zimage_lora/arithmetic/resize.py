"""`resize`: one adapter as a lower-rank LoRA, per module by a rank rule (`ranks.py`: a fixed rank,
an energy fraction, or kohya's sv_fro / sv_ratio / sv_cumulative).

A LoRA is reduced from its factors (QR + SVD of the r x r core, `lowrank.from_factors`), any other
algorithm (LoKr, LoHa, full diffs; DoRA, OFT, BOFT, GLoRA, IA3 given the base weights) from its dense
delta one module at a time; bias and norm diffs are
carried over unchanged. The size before and after and the error per module are reported.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..adapter import Adapter
from ..errors import InvalidArgumentError
from ..keys import ModuleIndex
from ..numerics import one_thread
from . import ranks
from .base import base_weights
from .combine import ArithmeticReport, build
from .common import Source, module_index, read_input


def resize(
    source: Source,
    *,
    rank: int | None = None,
    energy: float | None = None,
    fro: float | None = None,
    ratio: float | None = None,
    cumulative: float | None = None,
    model: str | Path | torch.nn.Module | ModuleIndex | None = None,
    dtype: str | torch.dtype | None = None,
) -> Adapter:
    """A LoRA `Adapter` of lower rank from `source` (any algorithm: DoRA, OFT, BOFT, GLoRA and IA3 need
    `model` with its weights, a checkpoint or a torch model); `fro`, `ratio` and `cumulative` follow
    kohya's resize_lora.py, with `rank` as their cap when given too."""
    return resize_report(source, rank=rank, energy=energy, fro=fro, ratio=ratio, cumulative=cumulative,
                         model=model, dtype=dtype)[0]


def resize_report(source: Source, *, rank: int | None = None, energy: float | None = None, fro: float | None = None,
                  ratio: float | None = None, cumulative: float | None = None,
                  model: str | Path | torch.nn.Module | ModuleIndex | None = None,
                  dtype: str | torch.dtype | None = None,
                  show_progress: bool = False) -> tuple[Adapter, ArithmeticReport]:
    started = time.perf_counter()
    rule = ranks.rule(rank=rank, energy=energy, fro=fro, ratio=ratio, cumulative=cumulative)
    if not rule.given:
        raise InvalidArgumentError("resize needs a rule: --rank R, --energy E, --fro F, --ratio R or --cumulative C.")
    index = module_index(model)
    with one_thread():  # many small tensors: one thread beats two contending ones (see numerics.one_thread)
        inp = read_input(source, index)
    report = ArithmeticReport("resize", [inp.record()], "svd", rule.as_dict())
    report.bytes_before = inp.adapter.nbytes()
    adapter = build([inp], index, "concat", rule, 1.0, 0, dtype, inp.adapter.name + "_resized", report,
                    show_progress, base=base_weights(model))
    before = {t.module: t.rank for t in inp.adapter.targets}
    for m in report.modules:
        m["rank_before"] = before.get(m["module"])
    report.bytes_after = adapter.nbytes()
    report.seconds = time.perf_counter() - started
    adapter.metadata = report.metadata()
    return adapter, report
