"""The bad inputs of tests/test_bad_inputs.py: each `Case` builds one (a file, folder or hub reference) in a
temporary folder and says which `LoRAError` subclass it must raise, with a message excerpt. The same
cases make the table of docs/bad-inputs.md (`python tests/test_bad_inputs.py`)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _hostile import (
    STEM,
    frame,
    lora,
    pickle_file,
    raw_file,
    with_value,
)

from zimage_lora import (
    AdapterNotFoundError,
    IncompatibleWeightsError,
    InvalidFormatError,
    LoRAConfiguration,
    LoRAError,
    UnsafeFileError,
)


@dataclass
class Case:
    id: str
    what: str  # for the docs table
    build: Callable[[Path], tuple[object, dict]]  # tmp dir -> (source, load kwargs)
    error: type[LoRAError]
    excerpt: str  # must appear in the message (case-insensitive)


def _src(p):
    return p, {}


def _truncated(tmp: Path, keep: int) -> tuple[object, dict]:
    full = lora(tmp / "full.safetensors")
    blob = full.read_bytes()
    cut = tmp / "cut.safetensors"
    cut.write_bytes(blob[: keep if keep >= 0 else len(blob) + keep])
    return cut, {}


def _fifo(tmp: Path):
    path = tmp / "pipe.safetensors"
    os.mkfifo(path)
    return path, {}


def _overlap(tmp: Path):
    header = {
        f"{STEM}.lora_A.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
        f"{STEM}.lora_B.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": [512, 1536]},
    }
    path = tmp / "overlap.safetensors"
    path.write_bytes(frame(json.dumps(header).encode(), bytes(1536)))
    return path, {}


def _offsets_outside(tmp: Path):
    header = {
        f"{STEM}.lora_A.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]},
        f"{STEM}.lora_B.weight": {"dtype": "F32", "shape": [64, 4], "data_offsets": [1 << 40, (1 << 40) + 1024]},
    }
    path = tmp / "outside.safetensors"
    path.write_bytes(frame(json.dumps(header).encode(), bytes(1024)))
    return path, {}


def _header(tmp: Path, header: bytes, length: int | None = None, data: bytes = b""):
    path = tmp / "bad.safetensors"
    path.write_bytes(frame(header, data, length))
    return path, {}


def _huge_rank_sparse(tmp: Path):
    # Offsets are consistent with the file size, but the file is sparse: 2 x 256 GiB claimed on disk,
    # almost nothing stored. Reading these tensors would need 512 GiB of memory.
    rank = 1 << 30
    n = rank * 64 * 4
    header = {
        f"{STEM}.lora_A.weight": {"dtype": "F32", "shape": [rank, 64], "data_offsets": [0, n]},
        f"{STEM}.lora_B.weight": {"dtype": "F32", "shape": [64, rank], "data_offsets": [n, 2 * n]},
    }
    path = tmp / "sparse.safetensors"
    h = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(h)) + h)
        fh.truncate(8 + len(h) + 2 * n)
    return path, {}


def _nan(tmp: Path, suffix: str, value: float):
    path = lora(tmp / "nan.safetensors", extra={f"{STEM}.alpha": ("F32", [])})
    return with_value(path, suffix, value), {}


def _f8_nan(tmp: Path):
    path = lora(tmp / "f8.safetensors", dtype="F8_E4M3")
    blob = bytearray(path.read_bytes())
    blob[-1] = 0x7F  # NaN in float8_e4m3fn (which has no Inf); torch has no isfinite for this dtype
    path.write_bytes(bytes(blob))
    return path, {}


def _mixed_duplicate(tmp: Path):
    # The same layer under ComfyUI's and diffusers' prefixes: two copies of one layer, neither preferred.
    return raw_file(tmp / "dup.safetensors", {
        f"{STEM}.lora_A.weight": ("F32", [4, 64]), f"{STEM}.lora_B.weight": ("F32", [64, 4]),
        "transformer.layers.0.attention.to_q.lora_down.weight": ("F32", [4, 64]),
        "transformer.layers.0.attention.to_q.lora_up.weight": ("F32", [64, 4]),
    }), {}


def _meta(tmp: Path, meta: dict):
    return lora(tmp / "meta.safetensors", metadata=meta), {}


def _peft_folder(tmp: Path, config: str):
    folder = tmp / "peft"
    folder.mkdir()
    raw_file(folder / "adapter_model.safetensors", {
        "base_model.model.layers.0.attention.to_q.lora_A.weight": ("F32", [4, 64]),
        "base_model.model.layers.0.attention.to_q.lora_B.weight": ("F32", [64, 4]),
    })
    (folder / "adapter_config.json").write_text(config)
    return folder, {}


def _pickle(tmp: Path, name: str):
    return pickle_file(tmp / name, tmp / "MARKER"), {}


def _pickle_folder(tmp: Path):
    folder = tmp / "old_peft"
    folder.mkdir()
    pickle_file(folder / "adapter_model.bin", tmp / "MARKER")
    return folder, {}


def _hub(filename: str):
    def build(tmp: Path):
        return LoRAConfiguration("org/name", filename=filename), {}
    return build


CASES: list[Case] = [
    Case("missing-path", "path that does not exist", lambda t: _src(t / "nope" / "missing.safetensors"),
         AdapterNotFoundError, "no such file or folder"),
    Case("not-regular", "a FIFO (not a regular file; opening it would block)", _fifo,
         AdapterNotFoundError, "not a regular file"),
    Case("empty-folder", "folder without any .safetensors", lambda t: _src(t),
         AdapterNotFoundError, "holds no .safetensors"),
    Case("empty-file", "empty file (0 bytes)", lambda t: (_w(t / "e.safetensors", b""), {}),
         InvalidFormatError, "too short"),
    Case("truncated-length", "truncated inside the 8-byte length field", lambda t: _truncated(t, 5),
         InvalidFormatError, "too short"),
    Case("truncated-header", "truncated inside the JSON header", lambda t: _truncated(t, 40),
         InvalidFormatError, "truncated"),
    Case("truncated-data", "truncated inside the tensor data (last 100 bytes cut)", lambda t: _truncated(t, -100),
         InvalidFormatError, "outside the data area"),
    Case("absurd-length", "header length field 2**63", lambda t: _header(t, b"{}", length=1 << 63),
         InvalidFormatError, "header length field"),
    Case("not-json", "header bytes are not JSON", lambda t: _header(t, b"this is not json"),
         InvalidFormatError, "not valid JSON"),
    Case("not-utf8", "header bytes are not UTF-8", lambda t: _header(t, b"\xff\xfe{}"),
         InvalidFormatError, "not valid JSON"),
    Case("json-deep", "header is JSON nested 100k deep (recursion bomb)",
         lambda t: _header(t, b"[" * 100_000 + b"]" * 100_000), InvalidFormatError, "not valid JSON"),
    Case("json-bigint", "header holds a 5000-digit integer", lambda t: _header(
        t, b'{"a.lora_A.weight": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}'),
         InvalidFormatError, "not valid JSON"),
    Case("json-array", "header is a JSON array, not an object", lambda t: _header(t, b"[1, 2]"),
         InvalidFormatError, "must be a JSON object"),
    Case("bad-metadata", "__metadata__ with a non-string value", lambda t: _header(
        t, b'{"__metadata__": {"a": 1}}'), InvalidFormatError, "__metadata__"),
    Case("no-tensors", "valid header with no tensors", lambda t: _header(t, b"{}"),
         InvalidFormatError, "holds no tensors"),
    Case("offsets-outside", "data offsets beyond the end of the file", _offsets_outside,
         InvalidFormatError, "outside the data area"),
    Case("offsets-mismatch", "offsets span fewer bytes than dtype x shape", lambda t: _header(
        t, json.dumps({f"{STEM}.lora_A.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 8]}}).encode(),
        data=bytes(8)), InvalidFormatError, "needs 1024 bytes"),
    Case("offsets-bool", "offsets given as JSON booleans", lambda t: _header(
        t, json.dumps({f"{STEM}.diff_b": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}).encode(),
        data=bytes(1)), InvalidFormatError, "data offsets"),
    Case("shape-negative", "negative dimension in a shape", lambda t: _header(
        t, json.dumps({f"{STEM}.lora_A.weight": {"dtype": "F32", "shape": [-4, 64], "data_offsets": [0, 0]}}).encode()),
         InvalidFormatError, "invalid shape"),
    Case("overlap", "two tensors sharing bytes", _overlap, InvalidFormatError, "overlap"),
    Case("dtype-unknown", "dtype 'Q4_K' (not a safetensors dtype)", lambda t: _header(
        t, json.dumps({f"{STEM}.lora_A.weight": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}).encode(),
        data=bytes(4)), InvalidFormatError, "dtype 'Q4_K'"),
    Case("dtype-list", "dtype given as a JSON list (found by fuzzing: unhashable)", lambda t: _header(
        t, json.dumps({f"{STEM}.lora_A.weight": {"dtype": [], "shape": [4], "data_offsets": [0, 4]}}).encode(),
        data=bytes(4)), InvalidFormatError, "has dtype []"),
    Case("dtype-int", "LoRA factors stored as I32", lambda t: _src(lora(t / "i.safetensors", dtype="I32")),
         InvalidFormatError, "must be floating point"),
    Case("dtype-dora-bool", "DoRA magnitude stored as BOOL", lambda t: _src(lora(
        t / "d.safetensors", extra={f"{STEM}.dora_scale": ("BOOL", [64, 1])})), InvalidFormatError,
         "DoRA magnitude must be floating point"),
    Case("rank-0d-factor", "0-d lora_A where a 2-D matrix is needed",
         lambda t: _src(lora(t / "r.safetensors", down=())),
         InvalidFormatError, "must be a 2-D matrix"),
    Case("rank-3d-factor", "3-D lora_B", lambda t: _src(lora(t / "r.safetensors", up=(64, 4, 2))),
         InvalidFormatError, "must be a 2-D matrix"),
    Case("rank-2d-alpha", "2-D alpha where a scalar is needed", lambda t: _src(lora(
        t / "a.safetensors", extra={f"{STEM}.alpha": ("F32", [4, 4])})), InvalidFormatError, "scalar alpha"),
    Case("rank-0d-diff-b", "0-d diff_b where a 1-D bias diff is needed", lambda t: _src(raw_file(
        t / "b.safetensors", {f"{STEM}.diff_b": ("F32", [])})), InvalidFormatError, "must be 1-D"),
    Case("rank-3d-diff", "3-D full diff", lambda t: _src(raw_file(
        t / "b.safetensors", {f"{STEM}.diff": ("F32", [64, 8, 8])})), InvalidFormatError, "1-D or 2-D"),
    Case("rank-mismatch", "lora_A rank 4, lora_B rank 8", lambda t: _src(lora(t / "m.safetensors", up=(64, 8))),
         InvalidFormatError, "rank mismatch"),
    Case("shape-not-fit", "LoRA for a 128-wide layer on the 64-wide to_q", lambda t: _src(lora(
        t / "w.safetensors", down=(4, 128), up=(128, 4))), IncompatibleWeightsError, "expects [64, 64]"),
    Case("norm-lora", "LoRA factors on a norm layer", lambda t: _src(lora(
        t / "n.safetensors", stem="diffusion_model.layers.0.attention.norm_q", down=(4, 32), up=(32, 4))),
         IncompatibleWeightsError, "norm layer takes only a full '.diff'"),
    Case("bias-no-bias", "diff_b on a Linear without bias", lambda t: _src(raw_file(
        t / "b.safetensors", {f"{STEM}.diff": ("F32", [64, 64]), f"{STEM}.diff_b": ("F32", [64])})),
         IncompatibleWeightsError, "module has no bias"),
    Case("dora-size", "DoRA magnitude of 7 values", lambda t: _src(lora(
        t / "d.safetensors", extra={f"{STEM}.dora_scale": ("F32", [7])})), IncompatibleWeightsError,
         "DoRA magnitude has 7 values"),
    Case("huge-rank", "rank 2**30 in a 512 GiB sparse file (offsets consistent)", _huge_rank_sparse,
         IncompatibleWeightsError, "not read into memory"),
    Case("huge-zero-dim", "shape [0, 2**70] (zero bytes, absurd width)", lambda t: _header(t, json.dumps({
        f"{STEM}.lora_A.weight": {"dtype": "F32", "shape": [0, 1 << 70], "data_offsets": [0, 0]},
        f"{STEM}.lora_B.weight": {"dtype": "F32", "shape": [64, 0], "data_offsets": [0, 0]}}).encode()),
         IncompatibleWeightsError, "expects [64, 64]"),
    Case("nan-factor", "NaN in lora_B", lambda t: _nan(t, "lora_B.weight", float("nan")),
         IncompatibleWeightsError, "NaN/Inf"),
    Case("inf-factor", "+Inf in lora_A", lambda t: _nan(t, "lora_A.weight", float("inf")),
         IncompatibleWeightsError, "NaN/Inf"),
    Case("nan-float8", "NaN in an F8_E4M3 lora_B", _f8_nan, IncompatibleWeightsError, "NaN/Inf"),
    Case("nan-alpha", "NaN alpha tensor", lambda t: _nan(t, ".alpha", float("nan")),
         InvalidFormatError, "expected a finite number"),
    Case("inf-kohya-alpha", "ss_network_alpha metadata 'inf'", lambda t: _meta(t, {"ss_network_alpha": "inf"}),
         InvalidFormatError, "ss_network_alpha"),
    Case("nan-config-alpha", "lora_adapter_metadata with lora_alpha NaN", lambda t: _meta(
        t, {"lora_adapter_metadata": '{"r": 4, "lora_alpha": NaN}'}), InvalidFormatError, "finite number"),
    Case("huge-config-alpha", "lora_adapter_metadata with lora_alpha 1.4e39 (found by fuzzing: fp32 overflow)",
         lambda t: _meta(t, {"lora_adapter_metadata": '{"r": 4, "lora_alpha": 1.4e39}'}), InvalidFormatError,
         "beyond the float32 range"),
    Case("str-config-alpha", "lora_adapter_metadata with lora_alpha \"x\"", lambda t: _meta(
        t, {"lora_adapter_metadata": '{"r": 4, "lora_alpha": "x"}'}), InvalidFormatError, "finite number"),
    Case("deep-metadata", "lora_adapter_metadata nested 5000 deep", lambda t: _meta(
        t, {"lora_adapter_metadata": "[" * 5000 + "]" * 5000}), InvalidFormatError, "not valid JSON"),
    Case("peft-bad-json", "PEFT folder whose adapter_config.json is not JSON", lambda t: _peft_folder(t, "{oops"),
         InvalidFormatError, "not valid JSON"),
    Case("peft-bad-pattern", "alpha_pattern with an invalid regex", lambda t: _peft_folder(
        t, '{"r": 4, "lora_alpha": 4, "alpha_pattern": {"(": 1}}'), InvalidFormatError, "cannot be used"),
    Case("peft-redos-pattern", "alpha_pattern '(.*)*(.*)*(.*)*Z' (catastrophic backtracking in re)",
         lambda t: _peft_folder(t, '{"r": 4, "lora_alpha": 4, "alpha_pattern": {"(.*)*(.*)*(.*)*Z": 1}, '
                                   '"use_rslora": false}'), None, ""),
    Case("peft-deep-config", "adapter_config.json nested 100k deep", lambda t: _peft_folder(
        t, "[" * 100_000 + "]" * 100_000), InvalidFormatError, "nested 100000 deep"),
    Case("peft-long-number", "adapter_config.json with a 5000-digit lora_alpha", lambda t: _peft_folder(
        t, '{"r": 4, "lora_alpha": ' + "7" * 5000 + "}"), InvalidFormatError, "a number of 5000 digits"),
    Case("peft-nested-groups", "alpha_pattern of 5000 nested groups (regex compiler recursion)",
         lambda t: _peft_folder(t, json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {
             "(" * 5000 + "to_q" + ")" * 5000: 2}})), InvalidFormatError, "groups nested 5000 deep"),
    Case("meta-nested-groups", "lora_adapter_metadata alpha_pattern of 5000 nested groups", lambda t: _meta(
        t, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 4, "alpha_pattern": {
            "(" * 5000 + "to_q" + ")" * 5000: 2}})}), InvalidFormatError, "groups nested 5000 deep"),
    Case("peft-list-pattern", "alpha_pattern is a list", lambda t: _peft_folder(
        t, '{"r": 4, "lora_alpha": 4, "alpha_pattern": [1]}'), InvalidFormatError, "must be a JSON object"),
    Case("duplicate-mixed", "same layer under diffusion_model. (lora_A) and transformer. (lora_down)",
         _mixed_duplicate, IncompatibleWeightsError, "duplicate targets"),
    Case("no-match", "valid LoRA for module names the model lacks", lambda t: _src(lora(
        t / "x.safetensors", stem="diffusion_model.not_a_block.proj")), IncompatibleWeightsError,
         "no key of this"),
    Case("strict-unmatched", "strict=True with one unknown key", lambda t: (lora(
        t / "s.safetensors", extra={"diffusion_model.nope.lora_A.weight": ("F32", [4, 64]),
                                    "diffusion_model.nope.lora_B.weight": ("F32", [64, 4])}), {"strict": True}),
         IncompatibleWeightsError, "strict mode"),
    Case("pickle-ckpt", ".ckpt pickle (would create a marker file when unpickled)", lambda t: _pickle(t, "a.ckpt"),
         UnsafeFileError, "never opened"),
    Case("pickle-pt", ".pt pickle", lambda t: _pickle(t, "a.pt"), UnsafeFileError, "never opened"),
    Case("pickle-bin", ".bin pickle", lambda t: _pickle(t, "a.bin"), UnsafeFileError, "never opened"),
    Case("pickle-pth", ".pth pickle", lambda t: _pickle(t, "a.pth"), UnsafeFileError, "never opened"),
    Case("pickle-folder", "folder holding only adapter_model.bin", _pickle_folder, UnsafeFileError, "never opened"),
    Case("pickle-renamed", "pickle renamed to .safetensors", lambda t: _pickle(t, "a.safetensors"),
         InvalidFormatError, "not a safetensors file"),
    Case("hub-dotdot", "hub filename '../../x.safetensors'", _hub("../../x.safetensors"), UnsafeFileError,
         "points outside"),
    Case("hub-dotdot-inner", "hub filename 'sub/../../x.safetensors'", _hub("sub/../../x.safetensors"),
         UnsafeFileError, "points outside"),
    Case("hub-absolute", "hub filename '/etc/x.safetensors'", _hub("/etc/x.safetensors"), UnsafeFileError,
         "points outside"),
    Case("hub-backslash", "hub filename '..\\\\x.safetensors'", _hub("..\\x.safetensors"), UnsafeFileError,
         "points outside"),
    Case("hub-pickle", "hub filename 'lora.bin'", _hub("lora.bin"), UnsafeFileError, "never opened"),
]
# The ReDoS pattern is not an error: the pattern is run on the `regex` engine with a time limit and
# simply does not match; the case asserts the load finishes (quickly) with the config's lora_alpha.
_SUCCEEDS = {"peft-redos-pattern"}


def _w(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
