"""A dynamic DoRA adapter's row norm is of the whole weight under it: when a merged adapter under it is
added, removed, replaced or re-weighted (or new weights are loaded), its output must equal a fresh
DoRA apply onto the weight as it is now."""

from __future__ import annotations

import pytest
import torch
from _apply_util import output, rel_err

from zimage_lora import (
    IncompatibleWeightsError,
    apply_adapter,
    examples,
    load_adapter,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dora")
    model = examples.tiny_model(seed=0)
    return {
        "m1": examples.make_adapter("kohya", tmp / "m1.safetensors", model, seed=1, alpha=8.0),
        "m2": examples.make_adapter("lycoris-lokr-factorized", tmp / "m2.safetensors", model, seed=2),
        "lycoris-dora": examples.make_adapter("lycoris-dora", tmp / "d.safetensors", model, seed=3, alpha=3.0),
        "peft-dora": examples.make_adapter("peft-dora", tmp / "pd", model, seed=4, alpha=6.0),
    }


def _fresh(files, dora: str, merged: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(output with only the merged adapters, output with a fresh dynamic DoRA on top)."""
    model = examples.tiny_model(seed=0)
    for name, scale in merged:
        apply_adapter(model, files[name], mode="merged", name=name, scale=scale)
    under = output(model)
    apply_adapter(model, files[dora], mode="dynamic", name="dora")
    return under, output(model)


DORAS = ["lycoris-dora", "peft-dora"]


@pytest.mark.parametrize("dora", DORAS)
def test_removing_merged_under_dora(files, dora):
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["m1"], mode="merged", name="m1")
    apply_adapter(model, files[dora], mode="dynamic", name="dora")
    remove_adapter(model, "m1")
    base, ref = _fresh(files, dora, [])
    assert rel_err(output(model), ref, base) < TOL


@pytest.mark.parametrize("dora", DORAS)
def test_replacing_merged_under_dora(files, dora):
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["m1"], mode="merged", name="m")
    apply_adapter(model, files[dora], mode="dynamic", name="dora")
    apply_adapter(model, files["m2"], mode="merged", name="m")  # same name: replaces m1
    base, ref = _fresh(files, dora, [("m2", 1.0)])
    assert rel_err(output(model), ref, base) < TOL


def test_merging_under_dora_and_reweighting(files):
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["lycoris-dora"], mode="dynamic", name="dora")
    apply_adapter(model, files["m1"], mode="merged", name="m1")  # merged after the DoRA was prepared
    base, ref = _fresh(files, "lycoris-dora", [("m1", 1.0)])
    assert rel_err(output(model), ref, base) < TOL
    set_adapter_scale(model, "m1", -0.5)
    base, ref = _fresh(files, "lycoris-dora", [("m1", -0.5)])
    assert rel_err(output(model), ref, base) < TOL
    set_active_adapters(model, ["dora"])  # m1 switched off: its delta leaves the weight
    base, ref = _fresh(files, "lycoris-dora", [])
    assert rel_err(output(model), ref, base) < TOL


def test_replacing_merged_with_dynamic_dora_of_the_same_name(files):
    """The DoRA is prepared while the merged adapter it replaces is still in the weight."""
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["m1"], mode="merged", name="x")
    apply_adapter(model, files["lycoris-dora"], mode="dynamic", name="x")
    base, ref = _fresh(files, "lycoris-dora", [])
    assert rel_err(output(model), ref, base) < TOL


def test_load_state_dict_under_dora(files):
    other = examples.tiny_model(seed=6)
    base = output(other)
    apply_adapter(other, files["lycoris-dora"], mode="dynamic", name="dora")
    ref = output(other)
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["lycoris-dora"], mode="dynamic", name="dora")
    model.load_state_dict(examples.tiny_model(seed=6).state_dict())
    assert rel_err(output(model), ref, base) < TOL


def test_failed_merge_under_dora_leaves_output_exact(files):
    """A merge that fails part-way is undone; the DoRA on top gives exactly what it gave before."""
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["m1"], mode="merged", name="m1")
    apply_adapter(model, files["lycoris-dora"], mode="dynamic", name="dora")
    before = output(model)
    bad = load_adapter(files["m2"], model, name="bad")
    last = bad.targets[-1]
    last.scale = 3e38  # finite, but overflows fp32 when merged: the last module raises after the others merged
    with pytest.raises(IncompatibleWeightsError):
        apply_adapter(model, bad, mode="merged", name="bad")
    assert torch.equal(output(model), before)


def test_fuse_and_unfuse_dora(files):
    """`unfuse` prepares the dynamic DoRA while its merged form is still in the weight."""
    from zimage_lora import Adapters

    model = examples.tiny_model(seed=0)
    handle = Adapters(model)
    handle.load(files["peft-dora"], name="dora")
    handle.fuse()
    handle.unfuse()
    base, ref = _fresh(files, "peft-dora", [])
    assert rel_err(output(model), ref, base) < TOL
