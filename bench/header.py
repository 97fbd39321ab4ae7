"""Huge safetensors headers: time to read and group N keys (pairs of 1x1 LoRA factors for modules the
model lacks, the shape of the 950k-key file that took 20-25 s), and to resolve them against the tiny model.

    python bench/header.py                   # 50k, 200k and 450k keys, 3 rounds each
    python bench/header.py --keys 200000 --rounds 5

Prints median wall and CPU seconds per stage. Headers above `MAX_TENSORS` (500,000) are refused before
parsing; the last row times that refusal for a 950,000-key file.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from pathlib import Path


def write(path: Path, n: int) -> int:
    entry = '"diffusion_model.x{}.lora_{}.weight":{{"dtype":"F32","shape":[1,1],"data_offsets":[{},{}]}}'
    raw = ("{" + ",".join(entry.format(i // 2, "AB"[i % 2], 4 * i, 4 * i + 4) for i in range(n)) + "}").encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4 * n))
    return len(raw)


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        fn()
    except Exception:  # noqa: BLE001 - resolving junk keys is refused; the time is what counts
        pass
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    from zimage_lora import examples, load_adapter
    from zimage_lora.formats import read_adapter_file, read_header, safetensors_file
    from zimage_lora.keys import ModuleIndex

    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, nargs="+", default=[50_000, 200_000, 450_000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    limit = getattr(safetensors_file, "MAX_TENSORS", float("inf"))
    index = ModuleIndex(examples.tiny_model())
    print("| keys | header MiB | stage | wall s (median) | CPU s (median) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in [*args.keys, 950_000]:
            path = Path(tmp) / f"h{n}.safetensors"
            size = write(path, n)
            refused = n > limit
            stages = {"read_header": lambda p=path: read_header(p)} if refused else {
                "read_header": lambda p=path: read_header(p),
                "read_adapter_file": lambda p=path: read_adapter_file(p),
                "load_adapter": lambda p=path: load_adapter(p, index),
            }
            for stage, fn in stages.items():
                runs = [timed(fn) for _ in range(args.rounds)]
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] for r in runs)
                label = f"{stage} (refused)" if refused else stage
                print(f"| {n:,} | {size / 2**20:.1f} | {label} | {wall:.2f} | {cpu:.2f} |")
            path.unlink()


if __name__ == "__main__":
    main()
