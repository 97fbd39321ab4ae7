"""`zimage-lora extract` on a full-size random Z-Image-Turbo pair (bf16, diffusers shards, ~12.3 GB each,
written to a temporary folder and deleted afterwards): wall time and peak RSS of the extract subprocess
(from wait4's rusage), and the error it reports. The tuned checkpoint is the base plus a planted
rank-16 difference on every Linear weight, so --rank 32 should recover it to bf16 rounding.
Target: peak RSS under 2 GB (one tensor pair at a time). Needs ~26 GB of free disk; run it once.
`--quick` runs the same steps on the tiny test model (examples.tiny_model, bf16): a smoke run of the
script in seconds, not a measurement.

    python bench/arith_extract.py [--workdir /tmp/x] [--keep]
    python bench/arith_extract.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, peak_rss_run, save  # noqa: E402
from checkpoint import _free_gb, write_checkpoint  # noqa: E402

PLANTED = 16


def write_tuned(base: Path, tuned: Path) -> None:
    """base + a rank-16 difference on every 2-D weight, shard by shard (same names, shapes, dtypes)."""
    from safetensors.torch import load_file, save_file

    tuned.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    for f in sorted(base.iterdir()):
        if f.suffix != ".safetensors":
            shutil.copy2(f, tuned / f.name)
            continue
        sd = load_file(str(f))
        for k, w in sd.items():
            if k.endswith(".weight") and w.dim() == 2:
                u = torch.randn(w.shape[0], PLANTED, generator=g) * 0.01
                v = torch.randn(PLANTED, w.shape[1], generator=g) / math.sqrt(w.shape[1])
                sd[k] = (w.float() + u @ v).to(w.dtype)
        save_file(sd, str(tuned / f.name))
        del sd
        print(f"  wrote tuned {f.name}", flush=True)


def write_quick(folder: Path) -> int:
    """The tiny test model in bf16 as a diffusers folder (one safetensors file + config.json)."""
    from zimage_lora.examples import tiny_model

    if not (folder / "config.json").is_file():
        tiny_model(seed=0).to(torch.bfloat16).save_pretrained(str(folder))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", type=Path)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--keep", action="store_true", help="keep the generated pair")
    p.add_argument("--tag", default="")
    p.add_argument("--quick", action="store_true", help="the tiny test model instead of the full-size pair")
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="arith_extract_"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.quick and _free_gb(work) < 2 * 12.4 + 1 and not (work / "tuned").is_dir():
        sys.exit(f"not enough disk at {work}: {_free_gb(work):.1f} GB free, ~26 GB needed")
    try:
        t0 = time.perf_counter()
        total = write_quick(work / "base") if args.quick else write_checkpoint(work / "base")
        if not (work / "tuned" / "config.json").is_file():
            write_tuned(work / "base", work / "tuned")
        t_write = time.perf_counter() - t0
        out = work / "extracted.safetensors"
        cmd = [sys.executable, "-m", "zimage_lora.cli", "extract", "--base", str(work / "base"), "--tuned",
               str(work / "tuned"), "--rank", str(args.rank), "--out", str(out), "--overwrite", "--json"]
        run = peak_rss_run(cmd)  # the extract's own peak, not this writer's (see `peak_rss_run`)
        rc, wall, peak_gb = run.rc, run.wall_s, run.peak_rss_gb
        doc = json.loads(run.stdout) if rc == 0 else {}
        if rc:
            print(run.stderr[-3000:], flush=True)
        verdict = "MET" if rc == 0 and peak_gb < 2.0 else "MISSED"
        ranks = sorted({m["rank"] for m in doc.get("modules", [])})
        rows = [[f"zimage-lora extract --rank {args.rank} (subprocess)", 2 * total / 1e9, peak_gb, wall,
                 2 * total / 1e9 / wall, len(doc.get("modules", [])), ranks, doc.get("error"), rc, verdict]]
        size = "the tiny test model's (--quick: a smoke run)" if args.quick else "a full-size"
        table = (f"Extract from {size} random bf16 Z-Image-Turbo pair (tuned = base + rank-{PLANTED} "
                 f"difference per Linear; pair written in {t_write:.0f} s), 2-core Xeon CPU. Target: peak RSS "
                 "< 2 GB.\n\n" + md_table(["what", "pair GB", "peak RSS GB", "wall s", "GB/s read", "modules",
                                           "ranks", "relative error", "exit", "target"], rows))
        save("arith-extract-cpu" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else ""),
             {"machine": machine("cpu"), "peak_rss_gb": peak_gb, "wall_s": wall, "rc": rc, "report": doc,
              "checkpoint_bytes": total}, table)
        print(table)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
