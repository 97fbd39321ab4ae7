"""Bake adapters into a base checkpoint, streaming: one tensor in memory at a time.

Each tensor is read from its file with a plain positioned read (no memory map, so the pages of a
multi-GB file never count against the process), the adapters that target it are merged in fp32,
the result is rounded once into the output dtype and written with `StreamingWriter`. Output goes
to a temporary path next to `out` and is renamed into place only when complete (`output.py`: an
existing output is moved aside first, and file-system failures become one message with the fix).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from .. import shapes
from ..adapter import Adapter, Target
from ..errors import IncompatibleWeightsError, InvalidFormatError, LoRAError, UnsupportedError
from ..formats.safetensors_file import DTYPES, TensorInfo
from ..formats.safetensors_writer import StreamingWriter
from ..loading import load_adapter
from ..numerics import check_landed
from ..sources import LoRAConfiguration
from .checkpoint import Checkpoint, open_checkpoint
from .checkpoint_layout import Relayout, check_layout
from .output import check_out, check_space, clean_leftovers, output_error, written_aside
from .specs import parse_lora_spec
from .target_math import merge_bias, merge_weight

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ..keys import ModuleIndex
    from .checkpoint_layout import Entry, _Sink

OUTPUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# checkpoint key -> ("weight" | "bias", the (target, strength) pairs merged into it)
ByKey = dict[str, tuple[str, list[tuple[Target, float]]]]


@dataclass
class MergeReport:
    out: Path
    adapters: list[dict[str, Any]] = field(default_factory=list)
    tensors: int = 0
    merged_tensors: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # warnings for the user: no-op strengths, repeats, leftovers


def merge_checkpoint(
    model: str | Path,
    loras: Sequence[LoRAConfiguration | str | Path | Adapter],  # str: SOURCE[:SCALE]
    out: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = False,
    layout: str = "same",
) -> MergeReport:
    """Merge `loras` (each with its scale) into the checkpoint at `model` and write it to `out`.

    `model`: diffusers transformer folder (or pipeline folder, or hub id in the HF cache) or one
    .safetensors file. `out`: a folder (same shard layout as the input) or a `.safetensors` file.
    `dtype`: output dtype of floating tensors ("bf16", "fp16", "fp32" or a torch dtype; None keeps each
    tensor's own). Returns what was done; raises `LoRAError` before writing anything when an adapter
    does not fit. `layout` (single-file `out` only): "comfyui" (native names, fused qkv), "diffusers"
    (split q/k/v) or "same" (the input's own names, the default).
    """
    started = time.perf_counter()
    out = Path(out)
    out_dtype = _output_dtype(dtype)
    if not loras:
        raise InvalidFormatError("nothing to merge: give at least one adapter (--lora SOURCE[:SCALE]).")
    check_out(out, overwrite)
    check_layout(layout, out.suffix == ".safetensors")
    ckpt = open_checkpoint(model)
    _check_out(out, ckpt)
    index = ckpt.module_index()
    by_module: dict[str, list[tuple[Target, float]]] = {}
    report = MergeReport(out=out)
    seen: dict[str, int] = {}
    for spec in loras:
        adapter, strength = _load(spec, index, strict)
        _note_repeats(adapter, strength, seen, report)
        if strength != 0:
            for target in adapter.targets:
                by_module.setdefault(target.module, []).append((target, strength))
        report.adapters.append({
            "name": adapter.name, "source": adapter.source, "format": adapter.format, "scale": strength,
            "targets": len(adapter.targets), "unmatched": len(adapter.unmatched),
            "unmatched_sample": [(u.key, u.reason) for u in adapter.unmatched[:5]],
        })
    by_key = _targets_by_key(ckpt, by_module)
    metadata = {"zimage_lora_merged": json.dumps([{k: a[k] for k in ("source", "scale")} for a in report.adapters])}
    _write_atomically(ckpt, by_key, out, out_dtype, metadata, report, progress, layout)
    report.seconds = time.perf_counter() - started
    return report


def _note_repeats(adapter: Adapter, strength: float, seen: dict[str, int], report: MergeReport) -> None:
    """A strength of 0 and the same file twice are legal but rarely meant: say so."""
    if strength == 0:
        report.notes.append(f"{adapter.source}: strength 0 changes nothing; it was not merged.")
    key = str(Path(adapter.source).resolve()) if adapter.source else adapter.name
    if key in seen:
        report.notes.append(
            f"{adapter.source} is given {seen[key] + 1} times; each one is merged, so its effect adds up. "
            "Give it once with the total strength if that was not meant."
        )
    seen[key] = seen.get(key, 0) + 1


def _write_atomically(ckpt: Checkpoint, by_key: ByKey, out: Path, out_dtype: torch.dtype | None,
                      metadata: dict[str, str], report: MergeReport, progress: bool, layout: str) -> None:
    removed, kept = clean_leftovers(out)
    report.notes += [f"removed {p.name}, left by an interrupted merge" for p in removed]
    report.notes += [f"{p.name} belongs to a merge still running; left alone" for p in kept]
    needed = _output_bytes(ckpt, out_dtype)
    try:
        check_space(out, needed)
        with written_aside(out) as tmp:
            _write(ckpt, by_key, out, tmp, out_dtype, metadata, report, progress, layout)
    except OSError as exc:
        if isinstance(exc, LoRAError):
            raise
        if exc.filename is not None and Path(exc.filename) in ckpt.files:  # the input, not the output
            raise InvalidFormatError(f"{exc.filename}: cannot read the checkpoint ({exc.strerror}).") from None
        raise output_error(exc, out, needed=needed) from None


def _output_bytes(ckpt: Checkpoint, out_dtype: torch.dtype | None) -> int:
    total = 0
    for _p, info in ckpt.tensors():
        src = DTYPES[info.dtype][0]
        if out_dtype is not None and src.is_floating_point:
            total += math.prod(info.shape) * out_dtype.itemsize
        else:
            total += info.nbytes
    return total


def _output_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or dtype == "keep":
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InvalidFormatError(f"output dtype must be floating point, got {dtype}.")
        return dtype
    aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
    key = aliases.get(str(dtype), str(dtype))
    if key not in OUTPUT_DTYPES:
        raise InvalidFormatError(f"unknown dtype {dtype!r}; choose one of {sorted(OUTPUT_DTYPES)} or 'keep'.")
    return OUTPUT_DTYPES[key]


def _check_out(out: Path, ckpt: Checkpoint) -> None:
    resolved = out.resolve()
    for path in [ckpt.root, *ckpt.files]:
        if resolved == path.resolve():
            raise LoRAError(f"{out} is the input checkpoint; write the merged model somewhere else.")
    if ckpt.kind == "folder" and resolved.is_relative_to(ckpt.root.resolve()):
        raise LoRAError(f"{out} is inside the input folder {ckpt.root}; write it somewhere else.")


def _load(spec: LoRAConfiguration | str | Path | Adapter, index: ModuleIndex, strict: bool) -> tuple[Adapter, float]:
    if isinstance(spec, Adapter):
        return spec, 1.0
    if isinstance(spec, str):
        cfg = parse_lora_spec(spec)
    else:
        cfg = spec if isinstance(spec, LoRAConfiguration) else LoRAConfiguration(spec)
    return load_adapter(cfg, index, strict=strict), cfg.scale


def _targets_by_key(ckpt: Checkpoint, by_module: dict[str, list[tuple[Target, float]]]) -> ByKey:
    """checkpoint key -> ("weight" | "bias", targets); every target must find its tensor, with its shape."""
    infos = {info.key: info for _p, info in ckpt.tensors()}
    by_key: ByKey = {}
    for module, targets in by_module.items():
        key = f"{ckpt.prefix}{module}.weight"
        info = infos.get(key)
        if info is None:
            raise IncompatibleWeightsError(
                f"{ckpt.root}: the adapter targets module '{module}' but the checkpoint has no tensor '{key}'. "
                "The config does not describe these weights; pass the matching checkpoint."
            )
        for scale_key in (f"{ckpt.prefix}{module}.scale_weight", f"{ckpt.prefix}{module}.weight_scale"):
            if scale_key in infos:
                raise UnsupportedError(
                    f"{ckpt.root}: '{key}' is stored scaled ('{scale_key}', e.g. a scaled-fp8 checkpoint); "
                    "merging would need to requantize it. Merge into the bf16/fp16 checkpoint instead, or apply "
                    "the adapter at run time (dynamic mode)."
                )
        bias_key = f"{ckpt.prefix}{module}.bias"
        _check_shape(ckpt, info, targets, bias_key in infos)
        by_key[key] = ("weight", targets)
        if any("diff_b" in t.tensors for t, _s in targets):
            by_key[bias_key] = ("bias", targets)
    return by_key


def _check_shape(ckpt: Checkpoint, info: TensorInfo, targets: list[tuple[Target, float]], has_bias: bool) -> None:
    """The checkpoint's own tensor must fit each target (the inventory may come from a config)."""
    if not DTYPES[info.dtype][0].is_floating_point:
        raise IncompatibleWeightsError(
            f"{ckpt.root}: '{info.key}' is {info.dtype} (quantized?); merging needs a floating-point checkpoint."
        )
    for target, _s in targets:
        where = (f"{ckpt.root}: '{info.key}' has shape {list(info.shape)}; adapter target {target.label} "
                 f"({target.source_keys[0] if target.source_keys else target.algorithm})")
        if len(info.shape) == 1:
            shapes.check_norm_target(where, target, info.shape, has_bias=has_bias)
        else:
            shapes.check_target(where, target, out_features=info.shape[0], in_features=math.prod(info.shape[1:]),
                                has_bias=has_bias)


def _out_files(ckpt: Checkpoint, out: Path) -> list[tuple[Path, list[tuple[Path, TensorInfo]]]]:
    """(output file name relative to the output root, tensors) per output file."""
    if out.suffix == ".safetensors":
        return [(Path(""), ckpt.tensors())]
    groups = []
    for path in ckpt.files:
        infos = sorted(ckpt.headers[path].tensors.values(), key=lambda t: t.start)
        groups.append((Path(path.name), [(path, i) for i in infos]))
    return groups


def _write(ckpt: Checkpoint, by_key: ByKey, out: Path, tmp: Path, out_dtype: torch.dtype | None,
           metadata: dict[str, str], report: MergeReport, progress: bool, layout: str = "same") -> None:
    single = out.suffix == ".safetensors"
    if not single:
        tmp.mkdir()
    total = ckpt.nbytes
    bar = _progress(progress)
    task = bar.add_task(f"merging into {out.name}", total=total) if bar else None
    weight_map: dict[str, str] = {}
    data_bytes = 0
    try:
        if bar:
            bar.start()
        for rel, tensors in _out_files(ckpt, out):
            target_path = tmp if single else tmp / rel
            entries = []
            for _p, info in tensors:
                src_dtype = DTYPES[info.dtype][0]
                dtype = out_dtype if (out_dtype is not None and src_dtype.is_floating_point) else src_dtype
                entries.append((info.key, dtype, info.shape))
                weight_map[info.key] = rel.name
            file_meta = dict(ckpt.headers[tensors[0][0]].metadata) if tensors else {}
            relayout = Relayout(entries, ckpt.prefix, layout) if layout != "same" else None
            writer = StreamingWriter(target_path, relayout.out if relayout else entries, {**file_meta, **metadata})
            try:
                sink = relayout.sink(writer) if relayout else writer
                _stream(ckpt, tensors, entries, by_key, sink, report, bar, task)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            report.bytes_written += target_path.stat().st_size
            data_bytes += writer.data_bytes
        if not single:
            _write_folder_files(ckpt, tmp, weight_map, data_bytes)
    finally:
        if bar:
            bar.stop()


def _stream(ckpt: Checkpoint, tensors: list[tuple[Path, TensorInfo]], entries: list[Entry], by_key: ByKey,
            writer: StreamingWriter | _Sink, report: MergeReport, bar: Progress | None, task: TaskID | None) -> None:
    handles: dict[Path, BinaryIO] = {}
    try:
        for (path, info), (_key, dtype, _shape) in zip(tensors, entries, strict=True):
            if path not in handles:
                handles[path] = open(path, "rb")  # noqa: SIM115 - closed below
            raw = _read_raw(handles[path], ckpt.headers[path].data_start, info)
            src_dtype = DTYPES[info.dtype][0]
            merge_into = by_key.get(info.key)
            if merge_into is None and dtype == src_dtype:
                writer.write_raw(info.key, raw)  # untouched: bytes copied as they are
            else:
                tensor = _decode(raw, src_dtype, info.shape)
                result = tensor.to(dtype)
                if merge_into is not None:
                    kind, targets = merge_into
                    merged = tensor.float() if src_dtype != torch.float32 else tensor.clone()
                    merged = merge_weight(merged, targets) if kind == "weight" else merge_bias(merged, targets)
                    merged = merged.to(dtype)  # checked as written: fp32 may be finite where fp16/bf16 is not
                    check_landed(info.key, merged, message=lambda key, _n: (
                        f"{ckpt.root}: merging into '{key}' gives non-finite values (base weight or adapter "
                        "overflow); nothing was written. Lower the scale or check the adapter."))
                    # Counted only when the written bytes differ: a delta below the dtype's rounding is no change.
                    report.merged_tensors += not torch.equal(merged, result)
                    result = merged
                writer.write(info.key, result)
            report.tensors += 1
            if bar and task is not None:  # the task exists whenever the bar does
                bar.advance(task, info.nbytes)
    finally:
        for fh in handles.values():
            fh.close()


def _read_raw(fh: BinaryIO, start: int, info: TensorInfo) -> torch.Tensor:
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        fh.seek(start + info.start)
        got = fh.readinto(memoryview(buf.numpy()))  # type: ignore[arg-type, attr-defined]  # numpy types its buffer for 3.12+; a file opened "rb" has readinto
        if got != info.nbytes:
            raise InvalidFormatError(f"{fh.name}: '{info.key}' is truncated ({got} of {info.nbytes} bytes).")
    return buf


def _decode(raw: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if raw.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype).reshape(shape)


def _write_folder_files(ckpt: Checkpoint, tmp: Path, weight_map: dict[str, str], data_bytes: int) -> None:
    for extra in ckpt.extra_files:
        shutil.copy2(extra, tmp / extra.name)
    if ckpt.index_name is not None:
        doc = dict(ckpt.index_doc or {})
        doc["metadata"] = {**(doc.get("metadata") or {}), "total_size": data_bytes}
        doc["weight_map"] = {k: weight_map[k] for k in doc.get("weight_map", weight_map)}
        (tmp / ckpt.index_name).write_text(json.dumps(doc, indent=2))


def _progress(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), transient=False
    )
