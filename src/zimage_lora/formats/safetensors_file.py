"""Reading safetensors files defensively: the header is parsed and checked by us before the
safetensors library touches the data, so a hostile or truncated file becomes a `LoRAError`, not a
crash or a huge allocation. Tensors are then read lazily, one key at a time, with `safe_open`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InvalidFormatError
from .untrusted import parse_json

# Far above any real adapter header (a 276-target LoKr file has ~200 KB of header).
MAX_HEADER_BYTES = 100 * 1024 * 1024
# A 276-target LoKr adapter has ~2,000 tensors, the full Z-Image transformer ~800. Headers below the
# limit are read in linear time (200,000 keys: 0.8 s of CPU, bench/header.py); above it they are refused
# unparsed.
MAX_TENSORS = 500_000

DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int = 0  # byte offset of the data area (8 + header length); tensor offsets count from it


def read_header(path: str | Path) -> Header:
    """Parse and validate a safetensors header without reading tensor data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise InvalidFormatError(
                    f"{path}: file is {size} bytes, too short for a safetensors header (needs at least 8). "
                    "The download is probably incomplete: download it again."
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise InvalidFormatError(
                    f"{path}: header length field says {n} bytes but the file has {size - 8} bytes after it "
                    f"(limit {MAX_HEADER_BYTES}). The file is truncated or not a safetensors file: "
                    "download it again."
                )
            raw = fh.read(n)
    except OSError as exc:
        raise InvalidFormatError(f"{path}: cannot read the file ({exc}). Check the path and permissions.") from exc
    # Every entry has one "data_offsets": counting them bounds the work before the JSON is parsed.
    declared = raw.count(b'"data_offsets"')
    if declared > MAX_TENSORS:
        raise InvalidFormatError(
            f"{path}: the header declares {declared} tensors; at most {MAX_TENSORS} are accepted (a Z-Image "
            "adapter or checkpoint has a few thousand). The file is not an adapter, or is hostile."
        )
    with gc_paused():
        return _parse_header(path, raw, size - 8 - n, 8 + n)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """A large header makes millions of small objects, none of them cyclic: the cyclic collector
    running over them again and again would take as long as parsing them (200,000 keys: 0.7 of 1.7 s).
    Reference counting still frees the header's objects; only the collection of cycles made elsewhere
    meanwhile waits until the read ends."""
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse_header(path: Path, raw: bytes, data_len: int, data_start: int) -> Header:
    doc = parse_json(raw, path, what="the safetensors header", fix="The file is corrupt: download it again.")
    if not isinstance(doc, dict):
        raise InvalidFormatError(f"{path}: the safetensors header must be a JSON object, found {type(doc).__name__}.")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidFormatError(f"{path}: '__metadata__' must map strings to strings.")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        tensors[key] = _check_entry(path, key, entry, data_len)
    _check_overlaps(path, tensors)
    return Header(path=path, tensors=tensors, metadata=dict(metadata), data_start=data_start)


def _check_entry(path: Path, key: str, entry: object, data_len: int) -> TensorInfo:
    # Fast path for a well-formed entry (headers may hold hundreds of thousands); anything unusual
    # falls through to the checks below, which name the problem.
    if type(entry) is dict:
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if type(dtype) is str and type(shape) is list and type(offsets) is list and len(offsets) == 2:
            start, end = offsets
            spec = DTYPES.get(dtype)
            if spec is not None and type(start) is int and type(end) is int and 0 <= start <= end <= data_len:
                count = 1
                for d in shape:
                    if type(d) is not int or d < 0:
                        break
                    count *= d
                else:
                    if end - start == count * spec[1]:
                        return TensorInfo(key, dtype, tuple(shape), start, end)
    return _entry_error(path, key, entry, data_len)


def _entry_error(path: Path, key: str, entry: object, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise InvalidFormatError(f"{path}: header entry for key '{key}' is not an object.")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or object here is unhashable
        raise InvalidFormatError(
            f"{path}: key '{key}' has dtype {dtype!r}; expected one of {sorted(DTYPES)}. "
            "Re-save the adapter with a standard dtype (e.g. float16)."
        )
    # `type(...) is int`: JSON true/false are Python ints too, and must not pass as sizes.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidFormatError(f"{path}: key '{key}' has an invalid shape {shape!r}.")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise InvalidFormatError(
            f"{path}: key '{key}' has data offsets {offsets!r} outside the data area of {data_len} bytes. "
            "The file is truncated or corrupt: download it again."
        )
    expected = math.prod(shape) * DTYPES[dtype][1]
    if offsets[1] - offsets[0] != expected:
        raise InvalidFormatError(
            f"{path}: key '{key}' ({dtype}, shape {shape}) needs {expected} bytes but its offsets span "
            f"{offsets[1] - offsets[0]}. The file is corrupt."
        )
    return TensorInfo(key, dtype, tuple(shape), offsets[0], offsets[1])


def _check_overlaps(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.key) for t in tensors.values() if t.end > t.start)
    for (_s0, e0, k0), (s1, _e1, k1) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise InvalidFormatError(
                f"{path}: tensors '{k0}' and '{k1}' overlap in the file (bytes {s1}..{e0}). The file is corrupt."
            )


def load_tensors(header: Header, keys: list[str]) -> dict[str, torch.Tensor]:
    """Read only `keys` from the file (already validated by `read_header`)."""
    out: dict[str, torch.Tensor] = {}
    if not keys:
        return out
    try:
        with safe_open(str(header.path), framework="pt", device="cpu") as fh:
            for key in keys:
                out[key] = fh.get_tensor(key)
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError types
        raise InvalidFormatError(f"{header.path}: reading tensor data failed ({exc}). The file is corrupt.") from exc
    return out
