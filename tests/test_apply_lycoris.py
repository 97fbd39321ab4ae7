"""Our engine against LyCORIS's own forward (its bypass/weight path at multiplier = our scale).

LyCORIS builds its modules from the same file with `create_lycoris_from_weights` on a deep copy of
the model; its forward applies the LoKr/LoHa scale once, which is the reference (its merge path
applies it twice).
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _apply_util import Pristine, output, rel_err
from lycoris import create_lycoris_from_weights
from safetensors.torch import load_file

from zimage_lora import apply_adapter, examples, remove_adapter

TOL = 2e-5
logging.getLogger("lycoris").setLevel(logging.ERROR)


def _lycoris_output(model, path, multiplier: float) -> torch.Tensor:
    ref = copy.deepcopy(model)
    network, _ = create_lycoris_from_weights(multiplier, str(path), ref)
    assert len(network.loras) == 37
    network.apply_to()
    return output(ref)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
@pytest.mark.parametrize("layout", ["lycoris-lokr", "lycoris-lokr-factorized", "lycoris-loha", "lycoris-lora"])
def test_matches_lycoris_forward(tmp_path, tiny, layout, mode):
    # rank 2: LyCORIS rebuilds a LoKr module from its shapes and only decomposes W2 when rank < dim / 2.
    path = examples.make_adapter(layout, tmp_path / f"{layout}.safetensors", tiny, rank=2, alpha=3.0, seed=7)
    scale = 0.75
    base = output(tiny)
    ref = _lycoris_output(tiny, path, scale)
    pristine = Pristine(tiny)
    apply_adapter(tiny, path, mode=mode, scale=scale)
    err = rel_err(output(tiny), ref, base)
    assert err < TOL, f"{layout} {mode}: relative error {err:.2e}"
    remove_adapter(tiny)
    pristine.assert_same(tiny)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_dora_matches_lycoris_forward(tmp_path, tiny, mode):
    path = examples.make_adapter("lycoris-dora", tmp_path / "dora.safetensors", tiny, rank=4, alpha=3.0, seed=8)
    base = output(tiny)
    ref = _lycoris_output(tiny, path, 1.0)
    pristine = Pristine(tiny)
    apply_adapter(tiny, path, mode=mode)
    err = rel_err(output(tiny), ref, base)
    assert err < TOL, f"dora {mode}: relative error {err:.2e}"
    remove_adapter(tiny)
    pristine.assert_same(tiny)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_full_diff_matches_weights_plus_diff(tmp_path, tiny, mode):
    # LyCORIS's full module deletes the layer's weight attribute, which diffusers' modules read, so the
    # reference is the definition itself: W + t * diff, b + t * diff_b, read straight from the file.
    path = examples.make_adapter("lycoris-full", tmp_path / "full.safetensors", tiny, seed=9)
    sd = load_file(str(path))
    ref_model = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, module in ref_model.named_modules():
            stem = "lycoris_" + name.replace(".", "_")
            if stem + ".diff" in sd:
                module.weight.add_(sd[stem + ".diff"], alpha=-0.5)
                if stem + ".diff_b" in sd:
                    module.bias.add_(sd[stem + ".diff_b"], alpha=-0.5)
    base = output(tiny)
    ref = output(ref_model)
    pristine = Pristine(tiny)
    apply_adapter(tiny, path, mode=mode, scale=-0.5)
    err = rel_err(output(tiny), ref, base)
    assert err < TOL, f"full {mode}: relative error {err:.2e}"
    remove_adapter(tiny)
    pristine.assert_same(tiny)
