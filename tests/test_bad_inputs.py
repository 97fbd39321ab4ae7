"""Bad inputs: each one gives a `LoRAError` subclass with a useful message, and the model is untouched.

Every case in `CASES` (tests/_bad_input_cases.py) is tried through `load_adapter` and through
`apply_adapter` in dynamic and merged mode; the model's parameters, buffers and module classes are
compared bit for bit with a snapshot taken before. `python tests/test_bad_inputs.py` prints the
table of docs/bad-inputs.md from these same cases.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from _bad_input_cases import _SUCCEEDS, CASES, Case, _huge_rank_sparse
from _hostile import (
    assert_untouched,
    lora,
    pickle_file,
    state_bits,
)

from zimage_lora import (
    IncompatibleWeightsError,
    InvalidFormatError,
    LoRAConfiguration,
    LoRAError,
    apply_adapter,
    examples,
    load_adapter,
    remove_adapter,
    sources,
)


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
