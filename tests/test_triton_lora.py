"""The Triton LoRA kernels (apply/triton_lora.py), checked on CPU through Triton's interpreter.

The kernels run in one subprocess with TRITON_INTERPRET=1 set before triton is imported
(tests/_triton_interp.py); it reports errors against an fp64 reference for the kernel and for the
unfused torch path (`x @ A^T`, then `out.addmm_`), which the tests below compare. fp16/bf16/fp32,
ranks 1/16/128, odd shapes (partial tiles on every edge), a strided output, stacked adapters. Where
CUDA is available the same checks also run compiled on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (it ships with CUDA builds of torch; [gpu] extra)")

HERE = Path(__file__).parent
TOL = {"fp32": 1e-6, "fp16": 2e-3, "bf16": 2e-2}  # lost fraction of the adapter's effect, vs fp64


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


MODES = ["interpret", pytest.param("cuda", marks=pytest.mark.skipif(not _cuda(), reason="no CUDA device"))]


@pytest.fixture(scope="module", params=MODES)
def results(request) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if request.param == "interpret":
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "_triton_interp.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _close(errs: dict, dtype: str) -> None:
    assert errs["fused"] < TOL[dtype], errs
    # no worse than the unfused torch path beyond rounding noise
    assert errs["fused"] <= 1.05 * errs["unfused"] + 1e-7, errs


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rank", [1, 16, 128])
def test_second_pass_matches_unfused(results, dtype, rank):
    errs = results[f"epilogue-{dtype}-r{rank}"]
    _close(errs, dtype)
    assert errs["outside_untouched"]  # writing a column slice leaves the rest of the output alone
    if dtype != "fp32" and results["device"] == "cpu":  # fp32 accumulation, one rounding, as CPU addmm_
        assert errs["vs_unfused"] == 0.0, errs


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("rank", [1, 16, 128])
def test_fused_gemm_epilogue_matches_unfused(results, dtype, rank):
    _close(results[f"linear-{dtype}-r{rank}"], dtype)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_stacked_adapters_are_one_product(results, dtype):
    errs = results[f"stacked-{dtype}"]
    assert errs["calls"] == [4 + 16 + 32]  # three adapters: one kernel with the summed rank
    _close(errs, dtype)
    # a changed strength reaches the cached concatenation (a stale one would be off by a whole adapter)
    assert errs["after_scale_fused"] < TOL[dtype], errs


def test_lora_add_dispatches_to_kernel(results):
    assert results["dispatch"]["calls"] == 1
    assert results["dispatch"]["err"] < 1e-5


def test_kernel_failure_falls_back_to_torch(results):
    """A Triton that cannot build its kernel (e.g. no C compiler) warns once and the torch path runs."""
    assert results["fallback"] == {"err": results["fallback"]["err"], "warnings": 1, "off": True}
    assert results["fallback"]["err"] < 1e-5


def test_cpu_stays_on_torch_without_interpreter():
    """Without the interpreter, CPU tensors never reach Triton."""
    import torch

    from zimage_lora.apply import kernels

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter is on for this whole run")
    assert kernels._triton(torch.zeros(2, 2)) is None
