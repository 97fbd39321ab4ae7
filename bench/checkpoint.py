"""Streaming checkpoint merge (`zimage-lora merge`) on a full-size random bf16 Z-Image-Turbo transformer
checkpoint (~12.3 GB, written once to the work folder in diffusers' sharded layout) with a 276-target
rank-32 LoRA: peak RSS of the merge subprocess (from wait4's rusage), wall time, throughput.
Target: peak RSS under 2 GB. The naive route (load the whole model, fuse, save) needs at least the
checkpoint's size in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from _common import md_table, peak_rss_run

from zimage_lora.inventory import default_config, meta_model

SHARD_BYTES = 2 << 30


def write_checkpoint(folder: Path) -> int:
    """Random bf16 weights with the real names and shapes; reused when already complete."""
    from safetensors.torch import save_file

    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index_path.is_file():
        return json.loads(index_path.read_text())["metadata"]["total_size"]
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {k: tuple(v.shape) for k, v in meta_model().state_dict().items()}
    pool = (torch.randn(1 << 24, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    shards: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        n = 2 * int(torch.Size(shape).numel())
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        sd = {}
        for j, k in enumerate(keys):
            numel = int(torch.Size(shapes[k]).numel())
            reps = -(-numel // pool.numel())
            start = (j * 7919) % pool.numel()
            sd[k] = pool.roll(start).repeat(reps)[:numel].reshape(shapes[k]).clone()
            weight_map[k] = fname
            total += 2 * numel
        save_file(sd, str(folder / fname))
        del sd
        print(f"  wrote {fname}", flush=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ZImageTransformer2DModel"} | default_config()))
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _free_gb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / 1e9


def run_checkpoint(workdir: Path, quick: bool = False) -> dict:
    from load import write_adapter

    workdir.mkdir(parents=True, exist_ok=True)
    free = _free_gb(workdir)
    need = 2 * 12.4 + 1
    if free < need and not (workdir / "ckpt" / "diffusion_pytorch_model.safetensors.index.json").is_file():
        msg = f"not enough disk at {workdir}: {free:.1f} GB free, {need:.1f} GB needed (checkpoint + merged copy)"
        print("  " + msg, flush=True)
        return {"error": msg, "table": msg}
    t0 = time.perf_counter()
    total = write_checkpoint(workdir / "ckpt")
    t_write = time.perf_counter() - t0
    lora = workdir / "lora_r32.safetensors"
    if not lora.is_file():
        write_adapter(lora, 32)
    out = workdir / "merged"
    cmd = [sys.executable, "-m", "zimage_lora.cli", "merge", "--model", str(workdir / "ckpt"),
           "--lora", f"{lora}:0.8", "--out", str(out), "--overwrite", "--quiet"]
    run = peak_rss_run(cmd)
    rc, wall, peak_gb, log = run.rc, run.wall_s, run.peak_rss_gb, run.stdout + run.stderr
    out_bytes = sum(p.stat().st_size for p in out.rglob("*.safetensors")) if out.exists() else 0
    shutil.rmtree(out, ignore_errors=True)
    print(f"  merge rc={rc} peak RSS {peak_gb:.2f} GB, {wall:.0f} s ({total / 1e9 / wall:.2f} GB/s), "
          f"out {out_bytes / 1e9:.2f} GB", flush=True)
    if rc != 0:
        print(log[-3000:], flush=True)
    verdict = "MET" if rc == 0 and peak_gb < 2.0 else "MISSED"
    rows = [["zimage-lora merge (subprocess)", total / 1e9, peak_gb, wall, total / 1e9 / wall, rc, verdict],
            ["naive: load whole model, fuse, save (lower bound)", total / 1e9, f">= {total / 1e9:.1f}", None, None,
             None, ""]]
    table = ("Streaming merge of a rank-32 LoRA (276 targets, scale 0.8) into a full-size random bf16 "
             f"Z-Image-Turbo transformer checkpoint (checkpoint written in {t_write:.0f} s). "
             "Target: peak RSS < 2 GB.\n\n"
             + md_table(["what", "checkpoint GB", "peak RSS GB", "wall s", "GB/s", "exit", "target"], rows))
    return {"checkpoint_bytes": total, "peak_rss_gb": peak_gb, "wall_s": wall, "rc": rc, "verdict": verdict,
            "log_tail": log[-2000:], "table": table}
