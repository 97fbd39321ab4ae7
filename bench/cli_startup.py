"""Wall time of the command line as a user sees it: `zimage-lora --help` and `zimage-lora inspect FILE`
against the default model (bundled inventory), medians of N fresh processes.

    python bench/cli_startup.py              # 3 runs each; a rank-16 bf16 LoRA on all 276 layers
    python bench/cli_startup.py --runs 5

Targets (issue 12): --help <= 0.5 s, inspect <= 1.5 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def turbo_lora(path: Path, rank: int = 16) -> Path:
    import torch
    from safetensors.torch import save_file

    from zimage_lora.inventory import bundled_modules

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, e in bundled_modules().items():
        if e["linear"]:
            out_f, in_f = e["shape"]
            tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, in_f, generator=g).bfloat16()
            tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(out_f, rank, generator=g).bfloat16()
    save_file(tensors, str(path))
    return path


def wall(argv: list[str], runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "zimage_lora.cli", *argv], capture_output=True, env=env)
        times.append(time.perf_counter() - started)
        if proc.returncode != 0 or proc.stderr:
            raise SystemExit(f"{argv}: exit {proc.returncode}, stderr {proc.stderr.decode()[:500]!r}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(SRC))
    with tempfile.TemporaryDirectory() as tmp:
        lora = turbo_lora(Path(tmp) / "turbo_r16.safetensors")
        size = lora.stat().st_size / 2**20
        for label, argv in (("--help", ["--help"]), (f"inspect ({size:.0f} MiB LoRA)", ["inspect", str(lora)])):
            times = wall(argv, args.runs)
            shown = ", ".join(f"{t:.2f}" for t in times)
            print(f"{label:28s} median {statistics.median(times):.2f} s  ({shown})")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
