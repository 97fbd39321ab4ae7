"""The demo: a small Z-Image transformer and an example adapter in every supported layout, each
applied merged and dynamic, its effect measured and its removal checked bit for bit."""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LoRAError
from ..examples import EXAMPLES, LAYOUTS, make_adapter, run_model, tiny_inputs, tiny_model
from ..layouts import LAYOUTS as LAYOUT_ROWS
from ..numerics import one_thread

if TYPE_CHECKING:
    from rich.console import Console

    from ..adapter import Adapter

#: dynamic and merged outputs must agree to this relative error (fp32).
AGREEMENT = 1e-4


@dataclass
class DemoRow:
    layout: str
    mode: str
    format: str = ""
    algorithm: str = ""
    targets: int = 0
    change: float = 0.0  # ||y_adapted - y_base|| / ||y_base||
    agrees: bool = True  # dynamic rows: matches the merged output
    restore_exact: bool = False
    seconds: float = 0.0
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and self.targets > 0 and self.change > 1e-6 and self.restore_exact and self.agrees


def run_demo(layouts: list[str] | None = None, workdir: str | Path | None = None, seed: int = 0) -> list[DemoRow]:
    """Every row: one layout in one mode. `workdir`: where the example files go (default: a temp folder)."""
    chosen = list(LAYOUTS) if layouts is None else layouts
    unknown = [x for x in chosen if x not in LAYOUTS]
    if unknown:
        raise LoRAError(f"unknown layout(s) {unknown}; known: {', '.join(LAYOUTS)}")
    with one_thread():  # a tiny model: one thread is several times faster than contended threads
        return _run(chosen, workdir, seed)


def _run(chosen: list[str], workdir: str | Path | None, seed: int) -> list[DemoRow]:
    from ..apply import apply_adapter, remove_adapter
    from ..keys import ModuleIndex
    from ..loading import load_adapter

    model = tiny_model(seed=seed)
    inputs = tiny_inputs(seed=seed)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    base = run_model(model, inputs)
    index = ModuleIndex(model)
    rows: list[DemoRow] = []
    with tempfile.TemporaryDirectory(prefix="zimage-lora-demo-") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for layout in chosen:
            suffix = "" if LAYOUT_ROWS[EXAMPLES[layout].layout].folder else ".safetensors"
            path = make_adapter(layout, folder / f"{layout}{suffix}", model, seed=seed + 1)
            merged_out = None
            for mode in ("merged", "dynamic"):
                row = DemoRow(layout, mode)
                started = time.perf_counter()
                try:
                    adapter = load_adapter(path, index, name=layout)
                    report = apply_adapter(model, adapter, mode=mode, name=layout)
                    out = run_model(model, inputs)
                    remove_adapter(model, layout)
                    row.seconds = time.perf_counter() - started
                    row.format, row.targets = report.format, len(report.applied)
                    row.algorithm = _algorithms(adapter)
                    row.change = float((out - base).norm() / base.norm())
                    if mode == "merged":
                        merged_out = out
                    elif merged_out is not None:
                        row.agrees = float((out - merged_out).norm() / (out - base).norm()) < AGREEMENT
                    row.restore_exact = _same(model, original, classes) and torch.equal(run_model(model, inputs), base)
                except LoRAError as exc:
                    row.error = str(exc)
                    row.seconds = time.perf_counter() - started
                    _reset(model, original)
                rows.append(row)
    return rows


def _algorithms(adapter: Adapter) -> str:
    algos = list(adapter.algorithms)
    if any(t.dora is not None for t in adapter.targets):
        algos.append("dora")
    return "+".join(algos)


def _same(model: torch.nn.Module, original: dict[str, torch.Tensor], classes: dict[str, type]) -> bool:
    state = model.state_dict()
    if state.keys() != original.keys():
        return False
    if any(type(m) is not classes.get(n) for n, m in model.named_modules()):
        return False
    return all(v.dtype == original[k].dtype and torch.equal(v, original[k]) for k, v in state.items())


def _reset(model: torch.nn.Module, original: dict[str, torch.Tensor]) -> None:
    from ..apply import remove_adapter

    try:
        remove_adapter(model)
    except LoRAError:
        pass
    model.load_state_dict(original)


def demo_summary(rows: list[DemoRow]) -> dict[str, Any]:
    """What `demo --json` prints: every row (one layout in one mode) and the verdict."""
    failed = [r for r in rows if not r.passed]
    return {
        "passed": not failed,
        "layouts": len({r.layout for r in rows}),
        "modes": sorted({r.mode for r in rows}),
        "failed": len(failed),
        "rows": [{**asdict(r), "passed": r.passed} for r in rows],
    }


def print_table(rows: list[DemoRow], console: Console | None = None) -> None:
    """One line per layout: both modes side by side."""
    from rich.markup import escape
    from rich.table import Table

    if console is None:
        from ..commands.output import console as make_console

        console = make_console(markup=True)
    table = Table(title="every layout, merged and dynamic, on a tiny Z-Image transformer")
    for col in ("layout", "format detected", "algorithm", "targets", "output change",
                "merged = dynamic", "restore exact", "time m/d", "result"):
        table.add_column(col, justify="right" if col in ("targets", "output change", "time m/d") else "left")
    by_layout: dict[str, list[DemoRow]] = {}
    for r in rows:
        by_layout.setdefault(r.layout, []).append(r)
    for layout, pair in by_layout.items():
        first = pair[0]
        ok = all(r.passed for r in pair)
        table.add_row(
            layout, first.format, first.algorithm, str(first.targets),
            f"{first.change:.1%}",
            "yes" if all(r.agrees for r in pair) else "[red]no[/red]",
            "yes" if all(r.restore_exact for r in pair) else "[red]no[/red]",
            "/".join(f"{r.seconds * 1000:.0f}" for r in pair) + " ms",
            "[green]ok[/green]" if ok else "[red]FAIL[/red]",
        )
    console.print(table)
    for r in rows:
        if r.error:  # in full, below the table: a message names files and keys that must not be cut
            console.print(f"{r.layout} ({r.mode}): {escape(r.error)}")
    failed = sum(not r.passed for r in rows)
    summary = "all passed" if not failed else f"{failed} of {len(rows)} failed"
    console.print(f"{len(by_layout)} layouts x {len({r.mode for r in rows})} modes: {summary}")
