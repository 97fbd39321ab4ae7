"""Adapter arithmetic on a 276-module rank-32 LoRA pair (the real Z-Image-Turbo inventory, bf16 files):
our factor path (QR of the stacked factors + SVD of the small core) against the dense-SVD way.

- ours, end to end on the whole pair: `combine` concat (exact), `combine --rank 32`, `resize --rank 16`
  (reading both files included), median of `--rounds`.
- per module, one module of each large shape (3840x3840 x136, 10240x3840 x68, 3840x10240 x34,
  15360x256 x32: 270 of the 276 modules), side by side in the same process:
  ours `lowrank.from_factors`; kohya-style dense SVD (svd_merge_lora.py / resize_lora.py's steps: the
  fp32 dense delta, `torch.linalg.svd` with its default full matrices, truncate); PEFT's own
  `add_weighted_adapter(combination_type="svd")` on a one-Linear model of that shape holding both
  LoRAs. Totals for 270 modules = per-module median x count (the dense ways would take the better part
  of an hour to run in full on 2 cores).

    python bench/arith.py            # ~5-10 minutes on 2 CPU cores
    python bench/arith.py --quick    # one round, the 3840x3840 shape only

On a machine shared with busy processes, `--cpu --threads 1` gives process CPU seconds without the
time idle worker threads spin on contended cores (every way runs under the same setting).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, md_table, median, save  # noqa: E402

SHAPES = {(3840, 3840): 136, (10240, 3840): 68, (3840, 10240): 34, (15360, 256): 32}
RANK = 32


def write_lora(path: Path, seed: int) -> None:
    """A random rank-32 bf16 LoRA on every Linear of the Z-Image-Turbo inventory (ComfyUI-style keys)."""
    from safetensors.torch import save_file

    from zimage_lora.inventory import meta_model

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in meta_model().named_modules():
        if isinstance(m, torch.nn.Linear):
            sd[f"diffusion_model.{name}.lora_A.weight"] = (torch.randn(RANK, m.in_features, generator=g)
                                                          / math.sqrt(m.in_features)).bfloat16()
            sd[f"diffusion_model.{name}.lora_B.weight"] = (torch.randn(m.out_features, RANK, generator=g)
                                                          * 0.01).bfloat16()
    save_file(sd, str(path))


CPU: list[float] = []  # process CPU seconds of every timed call, in order (see --cpu)


def timed(fn, rounds: int) -> list[float]:
    """Wall seconds per call; with --cpu the process's CPU seconds instead (robust on a machine shared
    by many busy processes, where wall time mostly measures waiting for a core)."""
    out = []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append(time.process_time() - c0 if USE_CPU else time.perf_counter() - t0)
    return out


USE_CPU = False


def kohya_dense(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int) -> tuple:
    """The dense way: sum of strength * up @ down in fp32, full SVD, keep `rank`."""
    delta = sum(s * (up.float() @ down.float()) for up, down, s in pairs)
    u, s, vh = torch.linalg.svd(delta)
    return u[:, :rank] * s[:rank], vh[:rank]


def peft_svd(pairs: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int, out_f: int, in_f: int):
    """PEFT's add_weighted_adapter(combination_type="svd") on a one-Linear model holding the LoRAs."""
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
    names = [f"in{i}" for i in range(len(pairs))]
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]), adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        for n, (up, down, _s) in zip(names, pairs, strict=True):
            layer.lora_A[n].weight.copy_(down.float())
            layer.lora_B[n].weight.copy_(up.float())

    def run():
        pm.base_model.add_weighted_adapter(names, [s for *_x, s in pairs], "merged", combination_type="svd",
                                           svd_rank=rank)
        pm.base_model.delete_adapter("merged")
    return run


def per_module(rounds: int, quick: bool) -> list[dict]:
    from zimage_lora.arithmetic import lowrank, ranks

    g = torch.Generator().manual_seed(5)
    rows = []
    rule = ranks.rule(rank=RANK)
    for (out_f, in_f), count in SHAPES.items():
        if quick and (out_f, in_f) != (3840, 3840):
            continue
        pairs = [((torch.randn(out_f, RANK, generator=g) * 0.01).bfloat16(),
                  (torch.randn(RANK, in_f, generator=g) / math.sqrt(in_f)).bfloat16(), s) for s in (0.8, 0.5)]
        ups = torch.cat([u.float() * s for u, _d, s in pairs], 1)
        downs = torch.cat([d.float() for _u, d, _s in pairs], 0)
        r_dense = 1 if (out_f * in_f > 3840 * 3840 or quick) else rounds
        cases = {
            "ours: factor path (QR + core SVD)": timed(lambda u=ups, d=downs: lowrank.from_factors(u, d, rule), rounds),
            "kohya-style dense SVD": timed(lambda p=pairs: kohya_dense(p, RANK), r_dense),
            "PEFT add_weighted_adapter svd": timed(peft_svd(pairs, RANK, out_f, in_f), r_dense),
        }
        ours = median(cases["ours: factor path (QR + core SVD)"])
        for name, ts in cases.items():
            rows.append({"shape": f"{out_f}x{in_f}", "count": count, "way": name, "median_s": median(ts),
                         "rounds": len(ts), "vs_ours": median(ts) / ours})
            print(f"  {out_f}x{in_f} {name}: {median(ts):.3f} s ({len(ts)} rounds)", flush=True)
    return rows


def end_to_end(rounds: int) -> list[dict]:
    from zimage_lora.arithmetic import combine, resize
    from zimage_lora.inventory import meta_model
    from zimage_lora.keys import ModuleIndex

    index = ModuleIndex(meta_model())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "a.safetensors", Path(tmp) / "b.safetensors"
        write_lora(a, 1)
        write_lora(b, 2)
        cases = {
            "combine concat (exact, rank 64)": lambda: combine([(a, 0.8), (b, 0.5)], model=index),
            "combine --rank 32 (factor path)": lambda: combine([(a, 0.8), (b, 0.5)], model=index, rank=RANK),
            "resize --rank 16 (factor path)": lambda: resize(a, model=index, rank=16),
        }
        for name, fn in cases.items():
            ts = timed(fn, rounds)
            rows.append({"what": name, "median_s": median(ts), "rounds": rounds})
            print(f"  {name}: {median(ts):.2f} s", flush=True)
        err = combine([(a, 0.8), (b, 0.5)], model=index, rank=RANK).metadata["zimage_lora_arithmetic"]
        rows.append({"what": "combine --rank 32: relative error (from metadata)", "median_s": None, "rounds": 0,
                     "error": __import__("json").loads(err)["error"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", default="")
    p.add_argument("--cpu", action="store_true", help="report process CPU seconds instead of wall seconds")
    p.add_argument("--skip-e2e", action="store_true", help="per-module comparison only")
    p.add_argument("--threads", type=int, help="torch intra-op threads for every way (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global USE_CPU
    USE_CPU = args.cpu
    rounds = 1 if args.quick else args.rounds
    print("end to end, whole 276-module pair:", flush=True)
    e2e = [] if args.skip_e2e else end_to_end(rounds)
    print("per module:", flush=True)
    mods = per_module(rounds, args.quick)
    totals = {}
    for r in mods:
        totals[r["way"]] = totals.get(r["way"], 0.0) + r["median_s"] * r["count"]
    ours_total = totals["ours: factor path (QR + core SVD)"]
    name = "arith-cpu" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    unit = "CPU s" if args.cpu else "s"
    table = ("Combine / resize of a 276-module rank-32 LoRA pair (bf16 files, Z-Image-Turbo shapes), "
             f"2-core Xeon CPU, {torch.get_num_threads()} torch thread(s), times in {unit}.\n\n"
             + md_table(["end to end (ours)", "median s", "rounds"],
                        [[r["what"], r["median_s"], r["rounds"]] if r["median_s"] is not None
                         else [r["what"] + f" = {r['error']:.3%}", None, None] for r in e2e])
             + "\n\nPer module, combining two rank-32 LoRAs to rank 32 (median s):\n\n"
             + md_table(["shape", "count", "way", "median s", "rounds", "x ours"],
                        [[r["shape"], r["count"], r["way"], r["median_s"], r["rounds"], r["vs_ours"]] for r in mods])
             + "\n\nEstimated over those modules (per-module median x count):\n\n"
             + md_table(["way", "total s", "x ours"], [[k, v, v / ours_total] for k, v in totals.items()]))
    save(name, {"machine": machine("cpu"), "threads": torch.get_num_threads(), "end_to_end": e2e,
                "per_module": mods, "totals": totals}, table)
    print(table)


if __name__ == "__main__":
    main()
