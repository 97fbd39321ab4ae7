"""Property: the public API, driven with random and degenerate adapters (rank 0, empty, huge or tiny
alpha, values past fp16's range, fp16/bf16 files) and strengths (0, huge, tiny, NaN, not a number), on
fp32 and bf16 models, raises nothing but a `LoRAError`; after any refused call the model is
bit-identical to before it; and removing everything at the end restores the model bit for bit.

Examples: `ZIMAGE_FUZZ_EXAMPLES` (default 40, a few seconds).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from _apply_util import Pristine
from _engine_state import assert_same, fingerprint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from zimage_lora import (
    Adapters,
    LoRAError,
    apply_adapter,
    examples,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)

EXAMPLES = int(os.environ.get("ZIMAGE_FUZZ_EXAMPLES", "40"))
MODELS = {dtype: examples.tiny_model(seed=0, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
PRISTINE = {dtype: Pristine(m) for dtype, m in MODELS.items()}
TARGETS = examples.linear_names(MODELS[torch.float32])[:4]
NAMES = ["a", "b", "c"]
STRENGTHS = st.sampled_from([0.0, 1.0, -1.0, 2.0, 0.5, 1e5, 3e38, -3e38, 1e-30, float("nan"), float("inf"), "x"])


@st.composite
def adapter_file(draw) -> dict:
    return {
        "rank": draw(st.sampled_from([0, 1, 4])),
        "dtype": draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        "alpha": draw(st.sampled_from([None, 0.0, 1.0, 4.0, -2.0, 1e-30, 3e38])),
        "magnitude": draw(st.sampled_from([0.0, 1e-3, 0.1, 300.0, 7e4])),
        "targets": draw(st.lists(st.sampled_from(TARGETS), min_size=0, max_size=3, unique=True)),
        "seed": draw(st.integers(0, 3)),
    }


def _write(path: Path, spec: dict) -> Path:
    """A kohya-spelled LoRA file as `spec` says (no target at all: an empty file)."""
    g = torch.Generator().manual_seed(spec["seed"])
    model = MODELS[torch.float32]
    sd: dict[str, torch.Tensor] = {}
    for name in spec["targets"]:
        m = model.get_submodule(name)
        stem = "lora_unet_" + name.replace(".", "_")
        for role, shape in (("lora_down", (spec["rank"], m.in_features)), ("lora_up", (m.out_features, spec["rank"]))):
            sd[f"{stem}.{role}.weight"] = (torch.randn(*shape, generator=g) * spec["magnitude"]).to(spec["dtype"])
        if spec["alpha"] is not None:
            sd[f"{stem}.alpha"] = torch.tensor(spec["alpha"])
    save_file(sd, str(path))
    return path


OPS = st.one_of(
    st.tuples(st.just("apply"), st.integers(0, 2), st.sampled_from(["dynamic", "merged"]), STRENGTHS,
              st.sampled_from(NAMES)),
    st.tuples(st.just("scale"), st.sampled_from(NAMES), STRENGTHS),
    st.tuples(st.just("active"), st.lists(st.sampled_from(NAMES), max_size=3), st.booleans(), STRENGTHS),
    st.tuples(st.sampled_from(["fuse", "unfuse", "enable", "disable", "unload"]),
              st.sampled_from([None, "a", "b", ["a", "b"], 5, ["a", "a"]])),
    st.tuples(st.just("remove"), st.sampled_from([None, "a", "c", "", 7])),
)


def _run(model: torch.nn.Module, files: list[Path], op: tuple) -> None:
    kind, handle = op[0], Adapters(model)
    if kind == "apply":
        _, i, mode, strength, name = op
        apply_adapter(model, files[i], mode=mode, scale=strength, name=name)
    elif kind == "scale":
        set_adapter_scale(model, op[1], op[2])
    elif kind == "active":
        _, names, weighted, strength = op
        set_active_adapters(model, names, [strength] * len(names) if weighted else None)
    elif kind == "remove":
        remove_adapter(model, op[1])
    else:
        getattr(handle, kind)(op[1])


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(list(MODELS)),
    specs=st.lists(adapter_file(), min_size=3, max_size=3),
    ops=st.lists(OPS, min_size=1, max_size=5),
)
def test_only_lora_errors_escape_and_a_refused_call_changes_nothing(dtype, specs, ops):
    model = MODELS[dtype]
    with tempfile.TemporaryDirectory() as tmp:
        files = [_write(Path(tmp) / f"f{i}.safetensors", s) for i, s in enumerate(specs)]
        try:
            for op in ops:
                before = fingerprint(model)
                listed = list_adapters(model)
                try:
                    _run(model, files, op)
                except LoRAError:
                    assert_same(fingerprint(model), before)
                    assert list_adapters(model) == listed
        finally:
            remove_adapter(model)
    PRISTINE[dtype].assert_same(model)
