"""Failures a caller can cause that escaped as other exceptions: each is a `LoRAError` now, and the
model is left as it was."""

from __future__ import annotations

import pytest
import torch
from _apply_util import Pristine
from _engine_state import assert_same, fingerprint
from safetensors.torch import save_file

from zimage_lora import (
    Adapters,
    IncompatibleWeightsError,
    InvalidArgumentError,
    LoRAError,
    apply_adapter,
    examples,
    remove_adapter,
    set_adapter_scale,
)


def _lora(path, model, rank: int, alpha: float | None, magnitude: float):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name in examples.linear_names(model)[:2]:
        m = model.get_submodule(name)
        stem = "lora_unet_" + name.replace(".", "_")
        sd[stem + ".lora_down.weight"] = torch.randn(rank, m.in_features, generator=g) * magnitude
        sd[stem + ".lora_up.weight"] = torch.randn(m.out_features, rank, generator=g) * magnitude
        if alpha is not None:
            sd[stem + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_a_rank_0_lora_is_no_change_not_a_value_error(tmp_path, mode):
    model = examples.tiny_model()
    pristine = Pristine(model)
    apply_adapter(model, _lora(tmp_path / "r0.safetensors", model, 0, None, 0.1), mode=mode)
    remove_adapter(model)
    pristine.assert_same(model)


def test_alpha_over_rank_3e38_at_strength_2_is_merged_or_refused(tmp_path):
    """scale 3e38 times strength 2 is past float32's range as one factor: the delta is built at its
    scale, then multiplied; where it overflows the overflow rule refuses it."""
    model = examples.tiny_model()
    w = model.get_submodule(examples.linear_names(model)[0]).weight.detach().clone()
    small = _lora(tmp_path / "small.safetensors", model, 1, 3e38, 1e-20)  # delta entries ~1e-40 * 3e38
    apply_adapter(model, small, mode="merged", scale=2.0, name="s")
    merged = model.get_submodule(examples.linear_names(model)[0]).weight
    assert torch.isfinite(merged).all() and not torch.equal(merged, w)
    remove_adapter(model)
    pristine = Pristine(model)
    big = _lora(tmp_path / "big.safetensors", model, 1, 3e38, 10.0)  # entries ~1e2 * 6e38
    with pytest.raises(IncompatibleWeightsError, match="overflows"):
        apply_adapter(model, big, mode="merged", scale=2.0)
    pristine.assert_same(model)
    apply_adapter(model, big, mode="merged", scale=1e-30, name="b")
    before = fingerprint(model)
    with pytest.raises(IncompatibleWeightsError, match="overflows"):
        set_adapter_scale(model, "b", 2.0)
    assert_same(fingerprint(model), before)


@pytest.mark.parametrize("method", ["enable", "disable", "unload"])
@pytest.mark.parametrize("names", [5, [5], ["a", "a"], b"a"])
def test_adapters_name_arguments_are_checked(tmp_path, method, names):
    model = examples.tiny_model()
    handle = Adapters(model)
    handle.load(_lora(tmp_path / "a.safetensors", model, 2, None, 0.1), "a")
    before = fingerprint(model)
    with pytest.raises(InvalidArgumentError):
        getattr(handle, method)(names)
    assert_same(fingerprint(model), before)
    assert issubclass(InvalidArgumentError, LoRAError)
