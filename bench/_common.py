"""Shared bench helpers: interleaved timing with medians, peak-memory probes, machine info, result files."""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: torch.device | str, inner: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `inner` back-to-back calls."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def interleaved(
    cases: dict[str, Callable[[], object]],
    device: torch.device | str,
    rounds: int,
    inner: int = 0,
    warmup: int = 1,
    min_sample_s: float = 0.02,
) -> dict[str, list[float]]:
    """Time every case once per round, rotating the order each round so drift hits all cases alike.

    `inner` calls per sample (0: chosen from the first case's time). Returns the per-round seconds of
    each case; callers take medians (of times, or of per-round ratios).
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    if inner <= 0:  # enough back-to-back calls that one sample lasts >= min_sample_s (GPU launch/sync noise)
        first = time_once(next(iter(cases.values())), device)
        inner = max(1, math.ceil(min_sample_s / max(first, 1e-9)))
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            times[n].append(time_once(cases[n], device, inner))
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num/den measured in the same round (robust to slow drifts of the machine)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --- memory ---------------------------------------------------------------------------------------------

def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak on a GPU, else the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) over the RSS at entry."""

    device: str = "cpu"
    extra_bytes: int = 0
    _base: int = field(default=0, repr=False)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra_bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self.extra_bytes = _status_kb("VmHWM") * 1024 - self._base


# --- machine and results --------------------------------------------------------------------------------

def machine(device: str) -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_avg": os.getloadavg()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("peft", "diffusers", "lycoris-lora"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def save(name: str, payload: dict, table: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    return path


def md_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dtype_of(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def engine():
    """The zimage_lora engine functions, or None while they are not part of the build."""
    try:
        import zimage_lora

        return zimage_lora.apply_adapter, zimage_lora.remove_adapter, zimage_lora.set_adapter_scale
    except (ImportError, AttributeError):
        return None


# Runs argv[1:] as a grandchild, waits for it, prints {"rc", "maxrss_kib"} as its last line and exits.
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print("\\n" + json.dumps({"rc": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


@dataclass
class MeasuredRun:
    rc: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_gb: float


def peak_rss_run(cmd: list[str]) -> MeasuredRun:
    """Run `cmd` and measure its own peak RSS. A forked child's ru_maxrss starts at its parent's RSS at
    the fork (the kernel keeps the old memory's high-water mark across exec), so a bench that has just
    written a 12 GB checkpoint would report its own size; `cmd` is therefore forked by a small fresh
    launcher process, whose wait4 reports the command alone."""
    import subprocess

    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True)
    wall = time.perf_counter() - t0
    out = proc.stdout.decode(errors="replace").rstrip("\n").rpartition("\n")
    result = json.loads(out[2])
    return MeasuredRun(result["rc"], out[0], proc.stderr.decode(errors="replace"), wall,
                       result["maxrss_kib"] * 1024 / 1e9)
