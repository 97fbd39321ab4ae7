"""Builders of hostile and broken adapter files, shared by the bad-input, fuzz and failure tests.

Every builder writes bytes exactly as given (no safetensors library involved), so headers can lie
about lengths, offsets, dtypes and shapes.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path

import torch

# Tiny model: attention.to_q is a (64, 64) Linear, attention.norm_q an RMSNorm of 32 values.
STEM = "diffusion_model.layers.0.attention.to_q"
OTHER = "diffusion_model.layers.1.attention.to_k"
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def frame(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """8-byte little-endian header length, header, data. `length` overrides the length field."""
    n = len(header) if length is None else length
    return struct.pack("<Q", n) + header + data


def raw_file(path: Path, tensors: dict[str, tuple[str, list[int]]], *, metadata: dict | None = None,
             fill: float | None = 0.01, header_extra: dict | None = None) -> Path:
    """A well-formed file whose tensors hold `fill` (F32/F16/BF16) or zeros; offsets computed."""
    header: dict = {}
    data = bytearray()
    for key, (dtype, shape) in tensors.items():
        n = math.prod(shape) * ITEMSIZE[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += _values(dtype, shape, fill)
    if metadata is not None:
        header["__metadata__"] = metadata
    header.update(header_extra or {})
    path.write_bytes(frame(json.dumps(header).encode(), bytes(data)))
    return path


def _values(dtype: str, shape: list[int], fill: float | None) -> bytes:
    count = math.prod(shape)
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                   "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}.get(dtype)
    if torch_dtype is None or fill is None:
        return bytes(count * ITEMSIZE[dtype])
    return torch.full((count,), fill, dtype=torch.float32).to(torch_dtype).view(torch.uint8).numpy().tobytes()


def lora(path: Path, *, down=(4, 64), up=(64, 4), dtype="F32", stem=STEM, fill=0.01, extra=None, metadata=None):
    tensors = {f"{stem}.lora_A.weight": (dtype, list(down)), f"{stem}.lora_B.weight": (dtype, list(up))}
    tensors.update(extra or {})
    return raw_file(path, tensors, fill=fill, metadata=metadata)


def with_value(path: Path, key_suffix: str, value: float) -> Path:
    """Rewrite the first element of the tensor whose key ends with `key_suffix` to `value` (F32 only)."""
    blob = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    key = next(k for k in header if k.endswith(key_suffix))
    start = 8 + n + header[key]["data_offsets"][0]
    blob[start:start + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(blob))
    return path


class MarkerPayload:
    """Unpickling this creates `marker` (via builtins.open): proof that a file was, or was not, unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def pickle_file(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"state_dict": {"lora_A.weight": MarkerPayload(marker)}}))
    return path


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes], revision: str = "a" * 40) -> Path:
    """A cache laid out as huggingface_hub lays it out: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    snap = repo / "snapshots" / revision
    for name, blob in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(blob)
    return snap


def state_bits(model: torch.nn.Module) -> dict[str, tuple[str, torch.dtype, tuple[int, ...], bytes]]:
    """Every parameter and buffer as raw bytes (catches -0.0 and NaN payload changes), plus module classes."""
    out: dict = {}
    for name, t in model.state_dict(keep_vars=False).items():
        t = t.detach().cpu().contiguous()
        out[name] = ("tensor", t.dtype, tuple(t.shape), t.view(-1).view(torch.uint8).numpy().tobytes())
    for name, module in model.named_modules():
        out["class:" + name] = ("class", None, (), type(module).__qualname__.encode())
    return out


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = state_bits(model)
    assert after.keys() == before.keys(), sorted(set(after) ^ set(before))[:10]
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"model changed after a failure: {changed[:10]}"
