"""Reading safetensors files defensively: the header is parsed and checked by us before the
safetensors library touches the data, so a hostile or truncated file becomes a `LoRAError`, not a
crash or a huge allocation. Tensors are then read lazily, one key at a time, with `safe_open`.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InvalidFormatError

# Far above any real adapter header (a 276-target LoKr file has ~200 KB of header).
MAX_HEADER_BYTES = 100 * 1024 * 1024

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
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert; RecursionError deep nesting.
        raise InvalidFormatError(
            f"{path}: the safetensors header is not valid JSON ({str(exc)[:200]}). "
            "The file is corrupt: download it again."
        ) from None
    if not isinstance(doc, dict):
        raise InvalidFormatError(f"{path}: the safetensors header must be a JSON object, found {type(doc).__name__}.")
    data_len = size - 8 - n
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidFormatError(f"{path}: '__metadata__' must map strings to strings.")
    tensors: dict[str, TensorInfo] = {}
    for key, entry in doc.items():
        tensors[key] = _check_entry(path, key, entry, data_len)
    _check_overlaps(path, tensors)
    return Header(path=path, tensors=tensors, metadata=dict(metadata), data_start=8 + n)


def _check_entry(path: Path, key: str, entry: object, data_len: int) -> TensorInfo:
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
