"""`zimage-lora inspect SOURCE`: what a file is and where it would land, without loading weights."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from ..adapter import Adapter

SUMMARY = "describe an adapter file and how it maps onto the model"

UNMATCHED_SHOWN = 40

HELP = """Show an adapter's format, algorithms, ranks/alphas, matched and unmatched targets, coverage by
block type, its size and the extra memory it needs in dynamic mode, how each scale was derived (and
when another loader would differ), and trainer data that is not adapter weights. The model inventory
is built on the meta device (no weights needed); default: the Z-Image-Turbo transformer (bundled
inventory). When no key matches, every key is listed with its reason and the exit status is 1.

examples:
  zimage-lora inspect style.safetensors
  zimage-lora inspect ./my_peft_folder --json
  zimage-lora inspect org/zimage-style --filename style_v2.safetensors
  zimage-lora inspect style.safetensors --model ./Z-Image-Turbo/transformer
"""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "inspect", help=SUMMARY,
        description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", help="a .safetensors file, a folder (PEFT folders too) or a hub id org/name")
    p.add_argument("--filename", help="file inside a folder or hub repository")
    p.add_argument("--revision", help="hub branch, tag or commit")
    p.add_argument("--model", help="diffusers transformer folder or its config.json (default: Z-Image-Turbo)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument(
        "--all", action="store_true",
        help=f"list every matched target (module, algorithm, rank, scale, keys) and every unmatched key "
             f"(default: no target list, the first {UNMATCHED_SHOWN} unmatched keys)",
    )
    p.add_argument("--strict", action="store_true", help="fail when any key does not match")
    p.add_argument("--blocks", action="store_true", help="print the norm of the scaled delta per block")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..inventory import inventory_model, load_config
    from ..keys import ModuleIndex
    from ..loading import load_adapter
    from ..numerics import one_thread
    from ..summary import summarize

    index = ModuleIndex(inventory_model(load_config(args.model)))
    with one_thread():
        adapter = load_adapter(
            args.source, index, filename=args.filename, revision=args.revision, strict=args.strict,
            allow_empty=True,
        )
    info = summarize(adapter, index)
    info["notes"] += _comfyui_notes(adapter)
    # matched_count counts norms and bias-only targets too; the Linear layers are counted on their own.
    shapes = index.shapes
    info["matched_linear_count"] = sum(1 for m in set(adapter.modules) if m in shapes and shapes[m].is_linear)
    if args.blocks:
        from ..block_norms import block_norms

        info["block_norms"] = block_norms(adapter)
    empty = not adapter.targets
    if args.json:
        from .output import emit_json

        emit_json(info)
    else:
        _print_tables(info, show_all=args.all or empty, list_targets=args.all)
    if empty:
        print(
            f"error: no key of this {info['format']} file matches a module of the model "
            f"({len(info['unmatched'])} keys unmatched, each listed with its reason).",
            file=sys.stderr,
        )
        return 1
    return 0


def _comfyui_notes(adapter: Adapter) -> list[str]:
    """Where ComfyUI would apply this file differently from its trainer (tools/targets.py says how)."""
    from ..tools.targets import comfyui_differences

    return [f"in ComfyUI, {line}" for line in
            comfyui_differences((t.module, t.algorithm, t.dora, t.tensors) for t in adapter.targets)]


def _print_tables(info: dict[str, Any], show_all: bool = False, list_targets: bool = False) -> None:
    from collections import Counter

    from rich.table import Table
    from rich.text import Text

    from .output import console as make_console

    console = make_console()
    console.print(Text(info["source"], style="bold"))
    summary = Table(box=None)
    summary.add_column("field")
    summary.add_column("value", overflow="fold")
    summary.add_row("format", info["format"])
    dora = f" + DoRA ({info['dora_orientation']})" if info["dora"] else ""
    summary.add_row("algorithms", (", ".join(info["algorithms"]) or "-") + dora)
    summary.add_row("ranks", ", ".join(f"{r} (x{n})" for r, n in info["ranks"].items()) or "-")
    summary.add_row("alphas", ", ".join(f"{a} (x{n})" for a, n in info["alphas"].items()) or "none (scale 1)")
    summary.add_row("scale rules", "; ".join(f"{r} (x{n})" for r, n in info["scale_rules"].items()) or "-")
    others = info["matched_count"] - info["matched_linear_count"]
    summary.add_row("matched", f"{info['matched_linear_count']} of {info['model_linear_count']} Linear layers"
                    + (f" + {others} other module(s) (norms, bias-only)" if others else ""))
    scales = Counter(round(t["scale"], 6) for t in info["targets"])
    summary.add_row("scale at strength 1", ", ".join(f"{s:g} (x{n})" for s, n in sorted(scales.items())) or "-")
    summary.add_row("unmatched keys", str(len(info["unmatched"])))
    if info["ignored"]:
        summary.add_row("ignored trainer data", ", ".join(u["key"] for u in info["ignored"]))
    summary.add_row("adapter size", _mb(info["adapter_bytes"]))
    summary.add_row("dynamic extra memory", _mb(info["dynamic_extra_bytes"]))
    console.print(summary)
    cov = Table(title="coverage")
    cov.add_column("block")
    cov.add_column("matched")
    for k, v in info["coverage"]["by_block"].items():
        cov.add_row(k, v)
    for k, v in info["coverage"]["by_kind"].items():
        cov.add_row(f"({k})", v)
    console.print(cov)
    if "block_norms" in info:
        console.print(_norm_table(info["block_norms"]))
    for note in info["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    for u in info["ignored"]:
        console.print(f"ignored: {u['key']}: {u['reason']}", markup=False, highlight=False)
    if list_targets and info["targets"]:
        tt = Table(title="targets")
        for col in ("module", "algorithm", "rank", "scale", "keys"):
            tt.add_column(col, overflow="fold")
        for t in info["targets"]:
            rows = f"[{t['rows'][0]}:{t['rows'][1]}]" if t["rows"] else ""
            tt.add_row(t["module"] + rows, t["algorithm"] + (" + DoRA" if t["dora"] else ""),
                       "-" if t["rank"] is None else str(t["rank"]), f"{t['scale']:g}", ", ".join(t["keys"]))
        console.print(tt)
    if info["unmatched"]:
        shown = info["unmatched"] if show_all else info["unmatched"][:UNMATCHED_SHOWN]
        um = Table(title="unmatched keys")
        um.add_column("key", overflow="fold")  # a key is folded onto the next line, never cut
        um.add_column("reason", overflow="fold")
        for u in shown:
            um.add_row(u["key"], u["reason"])
        console.print(um)
        if len(shown) < len(info["unmatched"]):
            more = len(info["unmatched"]) - len(shown)
            console.print(f"... {more} more unmatched keys: --all lists every one, --json gives them all too")


def _norm_table(norms: dict[str, float | None]) -> Table:
    """Per block, the delta's norm with a bar scaled to the largest (n/a: the delta needs the weight)."""
    from rich.table import Table

    top = max((v for v in norms.values() if v is not None), default=0.0) or 1.0
    table = Table(title="delta norm per block")
    table.add_column("block")
    table.add_column("norm", justify="right")
    table.add_column("")
    for block, v in norms.items():
        table.add_row(block, "n/a" if v is None else f"{v:.4g}", "" if v is None else "#" * round(20 * v / top))
    return table


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
