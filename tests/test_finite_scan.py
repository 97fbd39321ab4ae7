"""The NaN/Inf scan: the 16-bit bit test agrees with `isfinite` on every bit pattern, and a scan over
tensors fused into one span (an adapter read from one file) still names the first bad key."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_lora.numerics import all_finite, first_nonfinite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16bit_pattern_matches_isfinite(dtype):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    got = [all_finite(bits[i : i + 1]) for i in range(bits.numel())]
    assert got == torch.isfinite(bits).tolist()
    assert not all_finite(bits)  # the whole range holds NaN and Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_large_tensor_past_the_first_chunk(bad, dtype):
    t = torch.randn(3_000_001).to(dtype)
    assert all_finite(t)
    t[2_999_999] = bad
    assert not all_finite(t)
    assert all_finite(t[::2])  # a strided view (aminmax path) that skips the bad odd index


def test_fused_span_names_the_bad_key(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"k{i}": torch.randn(64, 33, generator=g).bfloat16() for i in range(6)}
    tensors["k4"][5, 7] = float("nan")
    save_file(tensors, str(tmp_path / "a.safetensors"))
    read = load_file(str(tmp_path / "a.safetensors"))
    ordered = {k: read[k] for k in sorted(read)}
    assert first_nonfinite(ordered) == "k4"
    del ordered["k4"]
    assert first_nonfinite(ordered) is None
    # Mixed dtypes and non-adjacent tensors form separate spans; the answer is the same.
    mixed = {"a": torch.ones(3), "b": read["k4"], "c": torch.ones(2, dtype=torch.float16)}
    assert first_nonfinite(mixed) == "b"
    assert first_nonfinite({"x": torch.ones(4, dtype=torch.int64)}) is None
