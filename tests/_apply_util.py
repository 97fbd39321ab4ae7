"""Helpers shared by the engine tests: reference comparisons and exact-restore checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zimage_lora import examples
from zimage_lora.apply.state import ForwardGate

#: Relative error (`rel_err`) within which two computations of one adapter's effect agree in fp32.
TOL = 2e-5


def adapter_file(tmp_path: Path, model: torch.nn.Module, layout: str, seed: int = 0, **kw: Any) -> Path:
    """An example adapter file (a folder for the PEFT layouts) of `layout` for `model`, named by layout and seed."""
    suffix = "" if layout.startswith("peft") else ".safetensors"
    return examples.make_adapter(layout, tmp_path / f"{layout}-{seed}{suffix}", model, seed=seed, **kw)


def rel_err(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """||ours - ref|| relative to the adapter's effect ||ref - base||."""
    effect = float((ref - base).norm())
    assert effect > 1e-3, "the adapter must visibly change the output for the comparison to mean anything"
    err = float((ours - ref).norm()) / effect
    print(f"relative error {err:.2e}")  # shown with `pytest -s`
    return err


class Pristine:
    """Everything that must come back after the last remove: tensors, names, module tree."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.tree = [(n, type(m), id(m)) for n, m in model.named_modules()]
        self.attrs = _own_attrs(model)
        self.pre_hooks = _other_hooks(model)

    def assert_same(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        assert list(state) == list(self.state)
        for key, value in self.state.items():
            assert state[key].dtype == value.dtype, key
            assert torch.equal(state[key], value), f"{key} changed"
        assert [(n, type(m), id(m)) for n, m in model.named_modules()] == self.tree
        assert _own_attrs(model) == self.attrs
        # The only thing that stays is the engine's forward gate (the `forward` attribute, no tensors).
        assert _other_hooks(model) == self.pre_hooks


def _own_attrs(model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.__dict__.items() if not isinstance(v, ForwardGate)}


def _other_hooks(model: torch.nn.Module) -> list:
    gate = ForwardGate
    return [h for h in model._forward_pre_hooks.values() if not isinstance(getattr(h, "__self__", None), gate)]


def output(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return examples.run_model(model, examples.tiny_inputs(seed=1, dtype=dtype))
