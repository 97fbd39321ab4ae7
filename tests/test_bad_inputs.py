"""Bad inputs: each one gives a `LoRAError` subclass with a useful message, and the model is untouched.

Every case in `CASES` is tried through `load_adapter` and through `apply_adapter` in dynamic and
merged mode; the model's parameters, buffers and module classes are
compared bit for bit with a snapshot taken before. `python tests/test_bad_inputs.py` prints the
table of docs/bad-inputs.md from these same cases.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _hostile import (
    STEM,
    assert_untouched,
    frame,
    hub_cache,
    lora,
    pickle_file,
    raw_file,
    state_bits,
    with_value,
)

from zimage_lora import (
    AdapterNotFoundError,
    DownloadError,
    IncompatibleWeightsError,
    InvalidFormatError,
    LoRAConfiguration,
    LoRAError,
    UnsafeFileError,
    apply_adapter,
    examples,
    load_adapter,
    remove_adapter,
    sources,
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


@pytest.fixture(scope="module")
def model():
    return examples.tiny_model(seed=0)


@pytest.fixture(scope="module")
def pristine(model):
    return state_bits(model)


pytestmark = pytest.mark.usefixtures("no_network")


def _run(mode: str, model, source, kwargs):
    if mode == "load":
        return load_adapter(source, model, **kwargs)
    if isinstance(source, LoRAConfiguration):
        return apply_adapter(model, source, mode=mode, **kwargs)
    return apply_adapter(model, source, mode=mode, name="bad", **kwargs)


@pytest.mark.parametrize("mode", ["load", "dynamic", "merged"])
@pytest.mark.parametrize("case", [c for c in CASES if c.id not in _SUCCEEDS], ids=lambda c: c.id)
def test_bad_input(case: Case, mode: str, model, pristine, tmp_path):
    source, kwargs = case.build(tmp_path)
    with pytest.raises(LoRAError) as info:
        _run(mode, model, source, kwargs)
    err = info.value
    assert isinstance(err, case.error), f"{type(err).__name__}: {err}"
    assert case.excerpt.lower() in str(err).lower(), str(err)
    # Messages name what failed: the file (or repo / folder) the user gave.
    shown = source.source if isinstance(source, LoRAConfiguration) else source
    assert str(shown) in str(err) or Path(str(shown)).name in str(err), str(err)
    assert not (tmp_path / "MARKER").exists(), "a pickle was unpickled"
    assert_untouched(model, pristine)


def test_redos_pattern_finishes_and_falls_back(model, tmp_path):
    source, _ = next(c for c in CASES if c.id == "peft-redos-pattern").build(tmp_path)
    adapter = load_adapter(source, model)
    assert [t.scale for t in adapter.targets] == [1.0]  # lora_alpha 4 / rank 4: the pattern did not match


def test_marker_pickle_really_runs_code_when_unpickled(tmp_path):
    """Control for the pickle cases: the payload does create its marker when unpickled."""
    path = pickle_file(tmp_path / "control.ckpt", tmp_path / "CONTROL")
    pickle.loads(path.read_bytes())
    assert (tmp_path / "CONTROL").exists()


@pytest.mark.parametrize("name", ["a.ckpt", "a.pt", "a.bin", "a.pth", "a.safetensors"])
def test_pickles_are_never_unpickled(name, model, tmp_path, monkeypatch):
    path = pickle_file(tmp_path / name, tmp_path / "MARKER")

    def tripwire(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", tripwire)
    monkeypatch.setattr(pickle, "loads", tripwire)
    monkeypatch.setattr(pickle, "Unpickler", tripwire)
    monkeypatch.setattr(torch, "load", tripwire)
    with pytest.raises(LoRAError):
        load_adapter(path, model)
    with pytest.raises(LoRAError):
        load_adapter(tmp_path, model, filename=name)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(model, tmp_path):
    path = lora(tmp_path / "locked.safetensors")
    path.chmod(0)
    with pytest.raises(InvalidFormatError, match="cannot read"):
        load_adapter(path, model)


def test_huge_rank_check_needs_no_memory(model, tmp_path, monkeypatch):
    """The 512 GiB claim is refused from the header alone: no tensor is read at all."""
    path, _ = _huge_rank_sparse(tmp_path)
    from zimage_lora.formats import safetensors_file

    def tripwire(*args, **kwargs):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(safetensors_file, "safe_open", tripwire)
    with pytest.raises(IncompatibleWeightsError, match="rank far above"):
        load_adapter(path, model)


@pytest.mark.parametrize("dtype", ["F8_E4M3", "F8_E5M2", "F16", "BF16", "F64"])
def test_every_float_dtype_applies(dtype, model, pristine, tmp_path):
    """Edge dtypes are read, checked for NaN/Inf (float8 included) and applied in both modes."""
    path = lora(tmp_path / "f.safetensors", dtype=dtype, fill=0.25)
    assert load_adapter(path, model).targets[0].tensors["down"].dtype == getattr(torch, {
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F16": "float16", "BF16": "bfloat16",
        "F64": "float64"}[dtype])
    base = examples.run_model(model, examples.tiny_inputs(seed=1))
    for mode in ("dynamic", "merged"):
        apply_adapter(model, path, mode=mode, name="edge")
        out = examples.run_model(model, examples.tiny_inputs(seed=1))
        assert torch.isfinite(out).all() and not torch.equal(out, base)
        remove_adapter(model)
        assert_untouched(model, pristine)


def test_high_but_sane_rank_still_loads(model, tmp_path):
    # rank 64 on a 64x64 layer: factors hold 2x the dense delta, the most a real file would do.
    adapter = load_adapter(lora(tmp_path / "r64.safetensors", down=(64, 64), up=(64, 64)), model)
    assert adapter.targets[0].rank == 64


# --- hub ---------------------------------------------------------------------------------------------

@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # The real huggingface_hub functions, not the test's refusal stand-ins.
    monkeypatch.setattr(sources, "_hf_hub_download", lambda **kw: __import__("huggingface_hub").hf_hub_download(**kw))
    monkeypatch.setattr(sources, "_snapshot_download",
                        lambda **kw: __import__("huggingface_hub").snapshot_download(**kw))
    return cache


@pytest.mark.parametrize("filename", [None, "lora.safetensors"])
def test_hub_offline_empty_cache_says_how_to_fix(offline_cache, model, pristine, filename):
    with pytest.raises(DownloadError) as info:
        load_adapter("someorg/some-lora", model, filename=filename)
    msg = str(info.value)
    assert "someorg/some-lora" in msg
    assert "hf download someorg/some-lora" in msg and "HF_HUB_CACHE" in msg
    assert_untouched(model, pristine)


@pytest.mark.parametrize("filename", [None, "lora.safetensors"])
def test_hub_cache_layout_resolves_offline(offline_cache, model, tmp_path, filename):
    local = examples.make_adapter("ai-toolkit", tmp_path / "local.safetensors", model,
                                  targets=["layers.0.attention.to_q", "layers.1.feed_forward.w2"])
    hub_cache(offline_cache, "someorg/some-lora", {"lora.safetensors": local.read_bytes()})
    from_hub = load_adapter("someorg/some-lora", model, filename=filename)
    from_disk = load_adapter(local, model)
    assert from_hub.modules == from_disk.modules == ["layers.0.attention.to_q", "layers.1.feed_forward.w2"]
    for a, b in zip(from_hub.targets, from_disk.targets, strict=True):
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert "models--someorg--some-lora" in from_hub.source


def test_hub_escape_never_calls_download(model, monkeypatch):
    calls = []
    monkeypatch.setattr(sources, "_hf_hub_download", lambda **kw: calls.append(kw) or "/etc/passwd")
    for bad in ["../x.safetensors", "a/../../x.safetensors", "/abs/x.safetensors", "..\\x.safetensors"]:
        with pytest.raises(UnsafeFileError, match="points outside"):
            load_adapter(LoRAConfiguration("org/name", filename=bad), model)
    assert calls == []


def test_hub_download_returning_pickle_is_refused(model, tmp_path, monkeypatch):
    # Even if the download layer hands back a pickle path, it is refused by suffix before reading.
    path = pickle_file(tmp_path / "weights.ckpt", tmp_path / "MARKER")
    monkeypatch.setattr(sources, "_hf_hub_download", lambda **kw: str(path))
    with pytest.raises(UnsafeFileError):
        load_adapter(LoRAConfiguration("org/name", filename="weights.safetensors"), model)
    assert not (tmp_path / "MARKER").exists()


# --- the docs table ----------------------------------------------------------------------------------

def _table() -> str:
    import tempfile

    model = examples.tiny_model(seed=0)
    rows = ["| input | error class | message excerpt |", "|---|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            source, kwargs = case.build(Path(tmp))
            try:
                load_adapter(source, model, **kwargs)
                result, text = "(loads)", "pattern does not match; config lora_alpha used"
            except LoRAError as exc:
                result, text = type(exc).__name__, str(exc).replace(tmp, "…")
        text = text.replace("|", "\\|")
        text = text if len(text) <= 170 else text[:167] + "…"
        rows.append(f"| {case.what.replace('|', '/')} | `{result}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sources._hf_hub_download = sources._snapshot_download = lambda **kw: (_ for _ in ()).throw(OSError("offline"))
    sys.stdout.write(_table() + "\n")
