"""`extract`: a LoRA from the difference of two checkpoints (tuned minus base), streaming.

Both checkpoints are opened without reading weights (`tools/checkpoint.py`: a diffusers folder with
shards, or one file with fused q/k/v) and must match: the same config, keys, shapes and dtypes, or the
first difference is named. Then one tensor pair at a time is read with plain positioned reads (no
memory map), its fp32 difference reduced by randomized SVD (`lowrank.randomized`) and dropped, so peak
memory is about one pair of the largest tensor plus its fp32 difference. A fused qkv difference becomes
to_q / to_k / to_v LoRAs sharing one down (exact rows of the fused LoRA); native module names become
diffusers ones. With `diffs`, norm weights and biases that changed are carried as exact diffs.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..adapter import Adapter, Provenance, Target
from ..errors import IncompatibleWeightsError, InvalidArgumentError
from ..formats.safetensors_file import DTYPES, TensorInfo
from ..keys.aliases import FUSED_QKV, alias_names, native_name, qkv_names
from ..tools.checkpoint import Checkpoint, open_checkpoint
from ..tools.checkpoint_merge import _decode, _read_raw
from . import lowrank, ranks
from .combine import ArithmeticReport
from .common import out_dtype, progress


def extract(base: str | Path, tuned: str | Path, *, rank: int | None = None, energy: float | None = None,
            diffs: bool = False, dtype: str | torch.dtype | None = None, oversample: int = 10, niter: int = 2,
            seed: int = 0) -> Adapter:
    """A LoRA `Adapter` of `tuned` - `base` (checkpoint folders or files of the same model)."""
    return extract_report(base, tuned, rank=rank, energy=energy, diffs=diffs, dtype=dtype, oversample=oversample,
                          niter=niter, seed=seed)[0]


def extract_report(base: str | Path, tuned: str | Path, *, rank: int | None = None, energy: float | None = None,
                   diffs: bool = False, dtype: str | torch.dtype | None = None, oversample: int = 10, niter: int = 2,
                   seed: int = 0, show_progress: bool = False) -> tuple[Adapter, ArithmeticReport]:
    started = time.perf_counter()
    rule = ranks.rule(rank=rank, energy=energy)
    if not rule.given:
        raise InvalidArgumentError("extract needs --rank R or --energy E.")
    if oversample < 0 or niter < 0:
        raise InvalidArgumentError(f"oversample and niter must be >= 0, got {oversample} and {niter}.")
    c0, c1 = open_checkpoint(base), open_checkpoint(tuned)
    pairs = _matched(c0, c1)
    report = ArithmeticReport("extract", [{"file": str(c0.root), "role": "base"},
                                          {"file": str(c1.root), "role": "tuned"}], "randomized svd", rule.as_dict())
    report.extra = {"oversample": oversample, "niter": niter, "seed": seed, "diffs": diffs}
    targets: dict[str, Target] = {}
    dt = None
    handles: dict[Path, BinaryIO] = {}
    try:
        with progress(show_progress, sum(i.nbytes for (_p, i), _ in pairs.values()), "extracting") as step:
            for key, ((p0, i0), (p1, i1)) in pairs.items():
                t0 = _read(c0, handles, p0, i0)
                src_dtype = t0.dtype
                dt = dt or out_dtype(dtype, [t0])
                diff = _read(c1, handles, p1, i1).float().sub_(t0.float())
                del t0
                _one(key[len(c0.prefix):], diff, rule, diffs, targets, report, dt, oversample, niter, seed,
                     src_dtype)
                del diff  # nothing of this pair outlives it but its factors
                trim_heap()
                step(i0.nbytes)
    finally:
        for fh in handles.values():
            fh.close()
    if not targets:
        raise IncompatibleWeightsError(f"{c1.root}: no weight differs from {c0.root}; there is nothing to extract.")
    report.bytes_after = sum(t.nbytes() for t in targets.values())
    report.seconds = time.perf_counter() - started
    adapter = Adapter(name=Path(c1.root).stem + "_minus_" + Path(c0.root).stem, format="extract", source="",
                      targets=list(targets.values()))
    adapter.metadata = report.metadata()
    return adapter, report


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        fn: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
        return fn
    except (AttributeError, OSError):  # not glibc (macOS, musl): nothing to hand back this way
        return None


def trim_heap() -> None:
    """Hand freed heap memory back to the system. glibc keeps freed blocks under its mmap threshold
    (raised to 32 MB by the first large free) in the heap; a stream of tensors of many sizes can leave
    that heap far larger than what is live."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)


def _matched(c0: Checkpoint, c1: Checkpoint) -> dict[str, Any]:
    """base key -> ((path, info) in the base, (path, info) in the tuned one); refusing the first config
    field, key, shape or dtype that differs."""
    if (c0.config or {}) != (c1.config or {}):
        fields = sorted(set(c0.config or {}) | set(c1.config or {}))
        name = next(f for f in fields if (c0.config or {}).get(f) != (c1.config or {}).get(f))
        raise IncompatibleWeightsError(
            f"{c1.root}: config field '{name}' is {(c1.config or {}).get(name)!r}, but {c0.root} has "
            f"{(c0.config or {}).get(name)!r}; extract needs two checkpoints of the same model.")
    k0 = {info.key[len(c0.prefix):]: (p, info) for p, info in c0.tensors()}
    k1 = {info.key[len(c1.prefix):]: (p, info) for p, info in c1.tensors()}
    for a, b, ca, cb in ((k0, k1, c0, c1), (k1, k0, c1, c0)):
        missing = next((k for k in a if k not in b), None)
        if missing is not None:
            raise IncompatibleWeightsError(
                f"{cb.root}: has no tensor '{cb.prefix}{missing}', which {ca.root} has; extract needs two "
                "checkpoints in the same layout (convert or re-save one of them).")
    for k, (_p, i0) in k0.items():
        i1 = k1[k][1]
        if tuple(i0.shape) != tuple(i1.shape) or i0.dtype != i1.dtype:
            raise IncompatibleWeightsError(
                f"{c1.root}: '{c1.prefix}{k}' is {i1.dtype} {list(i1.shape)}, but {c0.root} has {i0.dtype} "
                f"{list(i0.shape)}; extract needs two checkpoints of the same model and dtype.")
    return {c0.prefix + k: (v, k1[k]) for k, v in k0.items()}


def _read(ckpt: Checkpoint, handles: dict[Path, BinaryIO], path: Path, info: TensorInfo) -> torch.Tensor:
    if path not in handles:
        handles[path] = open(path, "rb")  # noqa: SIM115 - closed by the caller
    return _decode(_read_raw(handles[path], ckpt.headers[path].data_start, info), DTYPES[info.dtype][0], info.shape)


def _diffusers(module: str) -> str:
    """A native / ComfyUI module name in diffusers spelling (the inventory's)."""
    return next((a for a in alias_names(module) if native_name(a) != a), module)


def _one(name: str, diff: torch.Tensor, rule: ranks.RankRule, diffs: bool, targets: dict[str, Target],
         report: ArithmeticReport, dt: torch.dtype, oversample: int, niter: int, seed: int,
         src_dtype: torch.dtype) -> None:
    if not src_dtype.is_floating_point or not bool(diff.any()):
        return
    module, _, leaf = name.rpartition(".")
    if leaf == "weight" and diff.dim() == 2:
        trunc = lowrank.randomized(diff, rule, oversample=oversample, niter=niter, seed=seed)
        report.lost += trunc.lost
        report.total += trunc.total
        report.modules.append({"module": module, "rank": trunc.rank, "error": trunc.rel_error})
        up, down = trunc.up.to(dt), trunc.down.to(dt)
        if module.endswith(FUSED_QKV):
            d = up.shape[0] // 3
            for i, part in enumerate(qkv_names(module[: -len(FUSED_QKV)])):
                _lora(targets, part, up[i * d:(i + 1) * d], down)
        else:
            _lora(targets, _diffusers(module), up, down)
        return
    if not diffs or diff.dim() != 1 or leaf not in ("weight", "bias"):
        hint = "" if diffs else " (see --diffs)"
        report.notes.append(f"'{name}' differs but is not a Linear weight{hint}; left out.")
        return
    parts = [(_diffusers(module), diff)]
    if module.endswith(FUSED_QKV):
        d = diff.shape[0] // 3
        parts = [(p, diff[i * d:(i + 1) * d]) for i, p in enumerate(qkv_names(module[: -len(FUSED_QKV)]))]
    for m, piece in parts:
        role = "diff_b" if leaf == "bias" else "diff"
        t = targets.setdefault(m, Target(m, "full", {}))
        t.tensors[role] = piece.to(dt).clone()


def _lora(targets: dict[str, Target], module: str, up: torch.Tensor, down: torch.Tensor) -> None:
    r = down.shape[0]
    if r == 0:
        return
    bias = targets.pop(module).tensors.get("diff_b") if module in targets else None
    t = Target(module, "lora", {"down": down, "up": up.contiguous()}, scale=1.0, rank=r,
               about=Provenance(alpha=float(r)))
    if bias is not None:
        t.tensors["diff_b"] = bias
    targets[module] = t
