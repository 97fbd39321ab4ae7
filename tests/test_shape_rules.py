"""One shape rule set (`zimage_lora.shapes`) behind the three places that check an adapter's shapes:
the resolver (a file's header, `load_adapter`), the engine (an `Adapter` on the live model,
`apply_adapter`) and the checkpoint merger (`merge_checkpoint`). They used to disagree on DoRA
magnitudes: the resolver took any magnitude whose size matched the layer's rows or its inputs, the
engine wanted the size its orientation implies, and the merger did not look. The rule now: PEFT's
`(out,)`, LyCORIS' `(out, 1)` (per output row) or LyCORIS' `(1, in)` (per input column)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zimage_lora import Adapter, IncompatibleWeightsError, apply_adapter, examples, load_adapter, remove_adapter
from zimage_lora.adapter import Dora, Target
from zimage_lora.shapes import dora_on_out
from zimage_lora.tools.checkpoint_merge import merge_checkpoint

MODULE = "layers.0.feed_forward.w1"  # 170 x 64 in the tiny model: rows and inputs differ
OUT, IN, RANK = 170, 64, 4
GOOD = [(OUT,), (OUT, 1), (1, IN)]
# Sizes the resolver let through (they match the inputs, or the rows in the wrong orientation) and
# the engine then refused, plus one that fits nothing.
BAD = [(IN,), (IN, 1), (1, OUT), (7,)]


def _factors(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "down": torch.randn(RANK, IN, generator=g) * 0.1,
        "up": torch.randn(OUT, RANK, generator=g) * 0.1,
        "dora": torch.rand(shape, generator=g) + 0.5,
    }


def _file(tmp_path, shape) -> str:
    """A LyCORIS-style DoRA LoRA on one module (keys as LyCORIS saves them: lora_down/lora_up/dora_scale)."""
    f = _factors(shape)
    stem = "lycoris_" + MODULE.replace(".", "_")
    path = tmp_path / f"dora_{'x'.join(map(str, shape))}.safetensors"
    save_file({f"{stem}.lora_down.weight": f["down"], f"{stem}.lora_up.weight": f["up"],
               f"{stem}.alpha": torch.tensor(float(RANK)), f"{stem}.dora_scale": f["dora"]}, str(path))
    return str(path)


def _adapter(shape) -> Adapter:
    """The `Adapter` a loader that takes the magnitude as it is would build (orientation from its shape)."""
    f = _factors(shape)
    dora = Dora(f["dora"].reshape(-1), on_out=dora_on_out(shape))
    return Adapter("d", "test", "", [Target(MODULE, "lora", {"down": f["down"], "up": f["up"]}, dora=dora)])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "transformer"
    examples.tiny_model(seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("shape", BAD, ids=str)
def test_every_entry_point_refuses_a_misfit_magnitude(shape, tmp_path, checkpoint):
    model = examples.tiny_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IncompatibleWeightsError, match="DoRA magnitude"):
        load_adapter(_file(tmp_path, shape), model)
    for mode in ("merged", "dynamic"):
        with pytest.raises(IncompatibleWeightsError, match="DoRA magnitude"):
            apply_adapter(model, _adapter(shape), mode=mode)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(IncompatibleWeightsError, match="DoRA magnitude"):
        merge_checkpoint(checkpoint, [_adapter(shape)], tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("shape", GOOD, ids=str)
def test_every_entry_point_takes_a_fitting_magnitude_and_they_agree(shape, tmp_path, checkpoint):
    model = examples.tiny_model(seed=0)
    loaded = load_adapter(_file(tmp_path, shape), model)
    (target,) = loaded.targets
    assert target.dora.on_out == (shape != (1, IN))
    built = _adapter(shape)
    assert torch.equal(target.dora.magnitude, built.targets[0].dora.magnitude)
    apply_adapter(model, built, mode="merged", name="d")
    engine_w = model.get_submodule(MODULE).weight.detach().clone()
    remove_adapter(model)
    out = tmp_path / "out.safetensors"
    merge_checkpoint(checkpoint, [built], out)
    from safetensors.torch import load_file

    merged_w = load_file(str(out))[MODULE + ".weight"]
    base_w = examples.tiny_model(seed=0).get_submodule(MODULE).weight.detach()
    assert not torch.equal(engine_w, base_w)
    assert torch.allclose(merged_w, engine_w, rtol=1e-5, atol=1e-6)
