"""Property-based fuzzing of the reader, the key resolver and the engine.

Property: for any file, `load_adapter(path, model)` either succeeds with a sane `Adapter` or raises a
`LoRAError`; nothing else escapes. `apply_adapter` in both modes either succeeds (and
`remove_adapter` then restores the model bit for bit) or fails with a `LoRAError` and the model is
bit-identical to before. A loader that refused every file would pass those, so valid files (every
algorithm and key style, no mutation) must also load, change the output and come off bit for bit.

Examples per test: `ZIMAGE_FUZZ_EXAMPLES` (default 40, so the whole file runs in well under a
minute); a nightly-style run uses `ZIMAGE_FUZZ_EXAMPLES=10000`.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path

import torch
from _fuzz_files import (
    EXAMPLES,
    FUZZ,
    LINEARS,
    MODEL,
    PRISTINE,
    SHAPES,
    TORCH_DTYPES,
    _check_adapter,
    _header_and_data,
    _load_then_apply,
    _with_file,
    files,
    metadata,
    plausible_specs,
)
from _hostile import assert_untouched, frame, state_bits
from hypothesis import assume, given
from hypothesis import strategies as st

from zimage_lora import apply_adapter, examples, load_adapter, remove_adapter


@FUZZ
@given(files())
def test_structured_files(blob: bytes):
    _with_file(blob)


@FUZZ
@given(st.binary(max_size=200), st.one_of(st.none(), st.integers(0, (1 << 64) - 1)), st.binary(max_size=64))
def test_raw_header_bytes(header: bytes, length: int | None, data: bytes):
    _with_file(frame(header, data, length))


@FUZZ
@given(st.binary(max_size=64))
def test_raw_bytes(blob: bytes):
    _with_file(blob)


@FUZZ
@given(st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=12,
))
def test_json_headers(doc):
    """Any JSON value as header (or as a tensor entry of a known key)."""
    _with_file(frame(json.dumps(doc).encode()))
    _with_file(frame(json.dumps({"diffusion_model.layers.0.attention.to_q.lora_A.weight": doc}).encode()))


@FUZZ
@given(metadata(), st.sampled_from(["kohya", "diffusers", "peft"]))
def test_metadata_and_configs(meta, layout):
    """Real files with random metadata, and PEFT folders with random adapter_config.json."""
    with tempfile.TemporaryDirectory() as tmp:
        if layout == "peft":
            folder = examples.make_adapter("peft", Path(tmp) / "peft", MODEL, targets=["layers.0.attention.to_q"])
            text = (meta or {}).get("lora_adapter_metadata", "{}")
            (folder / "adapter_config.json").write_text(text)
            _load_then_apply(folder)
            return
        path = examples.make_adapter(layout, Path(tmp) / "a.safetensors", MODEL, targets=["layers.0.attention.to_q"])
        from safetensors.torch import load_file, save_file

        tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".alpha")}
        save_file(tensors, str(path), metadata={str(k): str(v) for k, v in (meta or {}).items()} or None)
        _load_then_apply(path)


def test_valid_files_load_apply_and_come_off():
    """Every valid file (any algorithm, key style, dtype; no mutation) loads with one target per
    module, changes the model's weights (merged) and each target's output (dynamic), and comes off
    bit for bit. Runs the `ZIMAGE_FUZZ_EXAMPLES` setting's number of examples (the setting is read)."""
    g = torch.Generator().manual_seed(0)
    probes = {m: torch.randn(3, SHAPES[m][1], generator=g) for m in LINEARS}
    with torch.no_grad():
        base = {m: MODEL.get_submodule(m)(x) for m, x in probes.items()}
    ran = []

    @FUZZ
    @given(plausible_specs(mutate=False))
    def check(specs):
        # Only files whose data is written out in full (`_data` truncates big tensors on purpose).
        assume(all(math.prod(shape) <= 1 << 16 for _, shape, _ in specs.values()))
        # Values of +-0.5: a LoHa of 0.01s (a 1e-10 delta) is a valid file that changes no fp32 output.
        specs = {k: (d, shape, math.copysign(0.5, fill)) for k, (d, shape, fill) in specs.items()}
        ran.append(specs)
        header, data = _header_and_data(specs)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "valid.safetensors"
            path.write_bytes(frame(json.dumps(header).encode(), bytes(data)))
            adapter = load_adapter(path, MODEL)
            _check_adapter(adapter)
            stems = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in specs}
            assert len(adapter.targets) == len(stems), (sorted(t.module for t in adapter.targets), sorted(stems))
            apply_adapter(MODEL, path, mode="merged", name="valid")
            assert state_bits(MODEL) != PRISTINE, "a merged adapter changed no weight"
            remove_adapter(MODEL)
            assert_untouched(MODEL, PRISTINE)
            apply_adapter(MODEL, path, mode="dynamic", name="valid")
            with torch.no_grad():
                for t in adapter.targets:
                    out = MODEL.get_submodule(t.module)(probes[t.module])
                    assert not torch.equal(out, base[t.module]), f"a dynamic adapter left {t.module} as it was"
            remove_adapter(MODEL)
            assert_untouched(MODEL, PRISTINE)

    check()
    assert len(ran) == EXAMPLES


def test_frame_helper_roundtrip():
    blob = frame(b"{}", b"xy")
    assert struct.unpack("<Q", blob[:8])[0] == 2 and blob[8:] == b"{}xy"
    # The builders' files without a lie are what the safetensors library itself reads, value for value.
    from safetensors.torch import load

    specs = {"a.lora_A.weight": ("BF16", [2, 3], -0.02), "a.alpha": ("F32", [], 0.5), "b.diff": ("F16", [4], 1e38)}
    header, data = _header_and_data(specs)
    tensors = load(frame(json.dumps(header).encode(), bytes(data)))
    assert tensors.keys() == specs.keys()
    for key, (dtype, shape, fill) in specs.items():
        expected = torch.full(shape, fill, dtype=torch.float32).to(TORCH_DTYPES[dtype])
        assert torch.equal(tensors[key], expected), key
