"""A target's placement (its rows in the module) is computed once and carried: validation makes it,
and the dynamic slots, merged rebuilds after a re-weight and the mode switch read that same object."""

from __future__ import annotations

import pytest

from zimage_lora import Adapters, apply_adapter, load_adapter, remove_adapter, set_adapter_scale
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.placement import Placement


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_each_target_is_placed_once(tmp_path, monkeypatch, mode):
    model = tiny_model(0)
    path = make_adapter("kohya", tmp_path / "a.safetensors", model, seed=1)
    adapter = load_adapter(path, model)
    made: list[tuple[object, object, int]] = []
    real = Placement.of.__func__  # type: ignore[attr-defined]

    def counting(cls, rows, delta_rows, out_features):  # noqa: ANN001 - Placement.of's own signature
        made.append((rows, delta_rows, out_features))
        return real(cls, rows, delta_rows, out_features)

    monkeypatch.setattr(Placement, "of", classmethod(counting))
    apply_adapter(model, adapter, mode=mode, name="a")
    set_adapter_scale(model, "a", 0.5)  # merged: every layer rebuilt from its factors
    Adapters(model).fuse() if mode == "dynamic" else Adapters(model).unfuse()
    remove_adapter(model)
    assert len(made) == len(adapter.targets) > 0
