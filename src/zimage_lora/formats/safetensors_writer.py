"""A minimal safetensors writer that streams tensors to disk one at a time.

The `safetensors` library writes a whole dict at once, so a checkpoint-sized file would need the
whole checkpoint in memory. The format is simple enough to write incrementally: the header (every
key's dtype, shape and byte range) is known before any data when the shapes and dtypes are known,
so it is written first and each tensor's bytes follow in header order.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from .safetensors_file import DTYPES

DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, (dtype, _size) in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors name") from None


def tensor_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype_name(dtype)][1]


class StreamingWriter:
    """Write `entries` (key, dtype, shape) in order; call `write` once per key, then `close`."""

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for key, dtype, shape in entries:
            size = tensor_bytes(dtype, tuple(shape))
            header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected.append((key, dtype, tuple(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, like the reference writer
        self.data_bytes = offset
        self._next = 0
        self._fh: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._expected):
            raise ValueError(f"{self.path}: unexpected extra tensor '{key}'")
        want_key, want_dtype, want_shape = self._expected[self._next]
        if key != want_key or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise ValueError(
                f"{self.path}: expected '{want_key}' {want_dtype} {list(want_shape)}, "
                f"got '{key}' {tensor.dtype} {list(tensor.shape)}"
            )
        self.write_raw(key, tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8))

    def write_raw(self, key: str, data: torch.Tensor) -> None:
        """Write a key's bytes as they are (a uint8 tensor), e.g. copied unchanged from another file."""
        want_key, want_dtype, want_shape = self._expected[self._next]
        if key != want_key or data.numel() != tensor_bytes(want_dtype, want_shape):
            raise ValueError(f"{self.path}: expected {tensor_bytes(want_dtype, want_shape)} bytes for '{want_key}'")
        if data.numel():
            self._fh.write(memoryview(data.numpy()))  # type: ignore[arg-type]  # numpy types its buffer for 3.12+ only
        self._next += 1

    def close(self) -> None:
        self._fh.close()
        if self._next != len(self._expected):
            missing = self._expected[self._next][0]
            raise ValueError(f"{self.path}: closed after {self._next} of {len(self._expected)} tensors ('{missing}')")

    def abort(self) -> None:
        self._fh.close()
