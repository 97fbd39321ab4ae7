"""Regional adapters: per layer, rows outside a mask are the base layer's exactly and rows inside are
the layer with the adapter at the mask's value; end to end, all-ones masks give the unmasked run and
all-zeros masks the base model exactly."""

from __future__ import annotations

import pytest
import torch

import zimage_lora as zl
from zimage_lora.apply.regional import token_weights
from zimage_lora.examples import make_adapter, tiny_config, tiny_model


def test_token_weights_of_boxes_and_arrays():
    # A box over the right half and the top quarter of a 4 x 4 token grid: by hand.
    want = torch.zeros(4, 4)
    want[0, 2:] = 1.0
    torch.testing.assert_close(token_weights((0.5, 0.0, 1.0, 0.25), (4, 4)), want.reshape(-1))
    # A box edge inside a token: the fraction of the token it covers.
    assert token_weights((0.0, 0.0, 0.375, 1.0), (1, 4)).tolist() == [1.0, 0.5, 0.0, 0.0]
    # An image-sized array, area-averaged: 8 x 8 pixels onto 2 x 2 tokens.
    img = torch.zeros(8, 8)
    img[:4, :4] = 1.0
    img[4:, 4:6] = 1.0
    assert token_weights(img, (2, 2)).tolist() == [1.0, 0.0, 0.0, 0.5]
    with pytest.raises(zl.InvalidArgumentError, match="box"):
        token_weights((0.5, 0.0, 0.2, 1.0), (2, 2))


def _inputs(n: int, seed: int = 1) -> dict:
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    return {"x": [torch.randn(cfg["in_channels"], 1, 8, 8, generator=g) for _ in range(n)], "t": torch.full((n,), 0.5),
            "cap_feats": [torch.randn(7, cfg["cap_feat_dim"], generator=g) for _ in range(n)]}


def _capture(model, name):
    seen = {}
    model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.update(x=a[0].detach(), out=o.detach()))
    return seen


@pytest.mark.parametrize("layer", ["layers.0.attention.to_q", "noise_refiner.0.feed_forward.w1", "all_x_embedder.2-1",
                                   "layers.1.adaLN_modulation.0"])
@pytest.mark.parametrize("layout", ["diffusers", "lycoris-lokr"])
def test_rows_outside_are_the_base_and_inside_the_adapter_at_the_mask_value(tmp_path, layer, layout):
    model = tiny_model(0)
    f = make_adapter(layout, tmp_path / "a.safetensors", model, seed=4)
    zl.apply_adapter(model, f, name="hero")
    seen = _capture(model, layer)
    soft = torch.tensor([[0.0, 0.25], [0.5, 1.0]]).repeat_interleave(2, 0).repeat_interleave(2, 1)  # 4x4 token grid
    masks = {"hero": [(0.5, 0.0, 1.0, 1.0), soft]}  # sample 0: right half; sample 1: soft quadrants
    inputs = _inputs(2)
    with torch.no_grad(), zl.regional_adapters(model, masks, caption=0.25):
        model(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)
    wrapper = model.get_submodule(layer)
    x, out = seen["x"], seen["out"]
    with torch.no_grad():
        base = wrapper.base_layer(x)
        full = wrapper(x)  # the adapter at its strength (1) on every row
    # The weight each row should get, from the token layout (not from the code under test): 4 x 4 image
    # tokens padded to 32, then 7 caption tokens padded to 32.
    right = torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(4)
    quads = soft.reshape(2, 2, 2, 2).mean((1, 3)).repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(-1)
    pad = torch.zeros(16)
    image = [torch.cat([right, pad]), torch.cat([quads, pad])]
    if layer.startswith("layers.0."):
        w = torch.stack([torch.cat([im, torch.full((32,), 0.25)]) for im in image])
    elif layer.startswith("noise_refiner."):
        w = torch.stack(image)
    elif layer.startswith("all_x_embedder"):
        w = torch.cat(image)
    else:  # one row per sample: the mask's mean
        w = torch.tensor([right.mean(), quads.mean()])
    w = w.reshape(-1)
    b2, f2, o2 = (t.reshape(-1, t.shape[-1]) for t in (base, full, out))
    assert b2.shape[0] == w.shape[0]
    off = w == 0
    assert torch.equal(o2[off], b2[off])  # outside: the base layer exactly
    want = b2 + w.unsqueeze(1) * (f2 - b2)
    torch.testing.assert_close(o2[~off], want[~off], rtol=1e-5, atol=1e-5)
    on = w == 1
    torch.testing.assert_close(o2[on], f2[on], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    from _tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("r")
    for i, name in enumerate(("hero", "villain")):
        f = make_adapter("diffusers", folder / f"{name}.safetensors", pipe.transformer, seed=10 + i)
        zl.apply_adapter(pipe.transformer, f, name=name, scale=1.5)
    return pipe


def _latents(pipe, n: int = 1):
    g = [torch.Generator().manual_seed(3 + i) for i in range(n)]
    return pipe(["a red cat", "a blue dog"][:n], height=32, width=32, num_inference_steps=2, guidance_scale=0.0,
                generator=g, output_type="latent").images


def test_end_to_end_all_ones_is_the_unmasked_run_and_all_zeros_the_base(tiny_pipe):
    ones = torch.ones(32, 32)
    unmasked = _latents(tiny_pipe, 2)
    with zl.regional_adapters(tiny_pipe, {"hero": ones, "villain": (0.0, 0.0, 1.0, 1.0)}):
        masked = _latents(tiny_pipe, 2)
    torch.testing.assert_close(masked, unmasked, rtol=1e-4, atol=1e-4)
    with zl.Adapters(tiny_pipe.transformer).disabled():
        base = _latents(tiny_pipe, 2)
    with zl.regional_adapters(tiny_pipe, {"hero": torch.zeros(32, 32), "villain": torch.zeros(5, 5)}):
        none = _latents(tiny_pipe, 2)
    assert torch.equal(none, base)
    with zl.regional_adapters(tiny_pipe, {"hero": (0.0, 0.0, 0.5, 1.0), "villain": (0.5, 0.0, 1.0, 1.0)}):
        split = _latents(tiny_pipe, 2)
    assert not torch.allclose(split, unmasked) and not torch.allclose(split, base)


def test_refusals(tiny_pipe):
    with pytest.raises(zl.LoRAError, match="dynamic mode"):
        with zl.regional_adapters(tiny_pipe, {"nobody": (0.0, 0.0, 1.0, 1.0)}):
            pass
    with pytest.raises(zl.InvalidArgumentError, match="2-D"):
        with zl.regional_adapters(tiny_pipe, {"hero": torch.ones(3)}):
            pass
    for caption in (float("nan"), float("inf"), {"hero": float("nan")}, "median"):
        with pytest.raises(zl.InvalidArgumentError, match="finite number"):
            with zl.regional_adapters(tiny_pipe, {"hero": (0.0, 0.0, 1.0, 1.0)}, caption=caption):
                pass
