"""Per-sample adapters: each sample of one batch equals that sample run alone with only its adapters."""

from __future__ import annotations

import pytest
import torch

import zimage_lora as zl
from zimage_lora.apply.per_sample import ATTR
from zimage_lora.examples import make_adapter, tiny_config, tiny_model

# One per algorithm the engine runs dynamically (see examples.LAYOUTS): LoRA, LoKr, LoHa (dense delta),
# DoRA (needs W x), full diff (dense delta + bias).
ALGORITHMS = {
    "lora": "diffusers",
    "lokr": "lycoris-lokr",
    "loha": "lycoris-loha",
    "dora": "lycoris-dora",
    "full": "lycoris-full",
}
# Four samples: captions of different lengths (7, 12, 40 -> padded 32, 32, 64) and one larger latent,
# so the embedders' concatenated rows and the padded (B, L, D) rows both have uneven per-sample blocks.
# (A 64-token caption needs a longer first RoPE axis than the tiny default.)
LONG = {"axes_lens": [128, 32, 32]}
CAPTIONS = (7, 12, 40, 9)
SIZES = ((8, 8), (8, 8), (8, 8), (16, 8))
TIMES = (0.3, 0.5, 0.7, 0.9)


def batch_inputs(seed: int = 5) -> dict:
    cfg = tiny_config(**LONG)
    g = torch.Generator().manual_seed(seed)
    return {
        "x": [torch.randn(cfg["in_channels"], 1, h, w, generator=g) for h, w in SIZES],
        "t": torch.tensor(TIMES),
        "cap_feats": [torch.randn(n, cfg["cap_feat_dim"], generator=g) for n in CAPTIONS],
    }


def pick(inputs: dict, idx: list[int]) -> dict:
    return {
        "x": [inputs["x"][i] for i in idx], "t": inputs["t"][idx], "cap_feats": [inputs["cap_feats"][i] for i in idx]
    }


@torch.no_grad()
def run(model, inputs: dict) -> list[torch.Tensor]:
    return [o.float() for o in model(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)[0]]


def alone(model, inputs: dict, i: int, spec: dict[str, float]) -> torch.Tensor:
    """Sample i by itself with exactly `spec` active (the reference)."""
    before = [(a.name, a.scale) for a in zl.list_adapters(model) if a.active]
    zl.set_active_adapters(model, list(spec), list(spec.values()))
    try:
        return run(model, pick(inputs, [i]))[0]
    finally:
        zl.set_active_adapters(model, [n for n, _ in before], [s for _, s in before])


def check_batch(model, inputs: dict, specs: list[dict[str, float]], tol: float = 1e-4) -> None:
    # Adapters written from an already wrapped model would name `...base_layer` and nest wrappers:
    # not the layout trainers produce, so the fixtures write them from a plain model.
    assert not any(isinstance(m.base_layer, zl.apply.AdapterLinear)
                   for m in model.modules() if isinstance(m, zl.apply.AdapterLinear))
    bases = [alone(model, inputs, i, {}) for i in range(len(specs))]
    with zl.per_sample_adapters(model, specs):
        got = run(model, inputs)
    for i, spec in enumerate(specs):
        if not spec:
            torch.testing.assert_close(got[i], bases[i], rtol=1e-5, atol=1e-5)
            continue
        ref = alone(model, inputs, i, spec)
        effect = float((ref - bases[i]).norm())
        assert effect > 1e-3 * float(bases[i].norm()), "the adapter must visibly change this sample"
        err = float((got[i] - ref).norm()) / effect
        assert err < tol, (i, spec, err)


# Adapters are written from a model without wrappers, as trainers write them.
CLEAN = tiny_model(0, **LONG)


@pytest.fixture
def model(tmp_path, one_torch_thread):
    m = tiny_model(0, **LONG)
    make_adapter("diffusers", tmp_path / "b.safetensors", CLEAN, seed=2)
    make_adapter("diffusers", tmp_path / "c.safetensors", CLEAN, seed=3)
    zl.apply_adapter(m, tmp_path / "b.safetensors", name="b")
    zl.apply_adapter(m, tmp_path / "c.safetensors", name="c", scale=0.7)
    return m


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_each_sample_equals_its_own_run(tmp_path, model, algorithm):
    path = make_adapter(ALGORITHMS[algorithm], tmp_path / "a.safetensors", CLEAN, seed=1)
    zl.apply_adapter(model, path, name="a", scale=0.9)
    # "c" is active but named by no spec: inside the block it must act on no sample.
    specs = [{"a": 1.0}, {}, {"a": 0.5, "b": 1.5}, {"b": -1.0}]
    check_batch(model, batch_inputs(), specs)


def test_active_set_unchanged_outside_the_block(model):
    inputs = batch_inputs()
    before = run(model, inputs)
    listing = zl.list_adapters(model)
    with zl.Adapters(model).per_sample([{"b": 2.0}, {}, {"c": 1.0}, {}]):
        inside = run(model, inputs)
    assert zl.list_adapters(model) == listing
    after = run(model, inputs)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert not torch.allclose(inside[1], before[1])  # sample 1 ran the base model inside the block
    assert ATTR not in model.__dict__
    assert all("_routing" not in w.__dict__ for w in model.modules() if isinstance(w, zl.apply.AdapterLinear))


def test_same_adapter_at_different_strengths(model):
    check_batch(model, batch_inputs(), [{"b": 0.25}, {"b": 1.0}, {"b": 1.0}, {"b": -2.0}])


def test_batch_size_mismatch_is_an_error_and_leaves_the_model_usable(model):
    inputs = batch_inputs()
    with pytest.raises(zl.LoRAError, match="3 specs but the model ran a batch of 4"):
        with zl.per_sample_adapters(model, [{"b": 1.0}, {}, {}]):
            run(model, inputs)
    assert ATTR not in model.__dict__
    zl.set_adapter_scale(model, "b", 0.5)  # the forward lock was released despite the error
    run(model, inputs)


def test_bad_specs_are_errors(model, tmp_path):
    with pytest.raises(zl.LoRAError, match="'nope', which is not attached"):
        with zl.per_sample_adapters(model, [{"nope": 1.0}]):
            pass
    with pytest.raises(zl.LoRAError, match="finite"):
        with zl.per_sample_adapters(model, [{"b": float("nan")}]):
            pass
    with pytest.raises(zl.LoRAError, match="non-empty list"):
        with zl.per_sample_adapters(model, {"b": 1.0}):
            pass
    path = make_adapter("diffusers", tmp_path / "m.safetensors", CLEAN, seed=4)
    zl.apply_adapter(model, path, name="m", mode="merged")
    with pytest.raises(zl.LoRAError, match="merged into the weights"):
        with zl.per_sample_adapters(model, [{"m": 1.0}]):
            pass
    with zl.per_sample_adapters(model, [{}]):
        with pytest.raises(zl.LoRAError, match="already open"):
            with zl.per_sample_adapters(model, [{}]):
                pass


def test_merged_adapters_act_on_every_sample(model, tmp_path):
    inputs = batch_inputs()
    path = make_adapter("diffusers", tmp_path / "m.safetensors", CLEAN, seed=4)
    zl.apply_adapter(model, path, name="m", mode="merged")
    # The reference for each sample: "m" (merged, active) plus that sample's dynamic adapters.
    specs = [{"b": 1.0}, {}, {"c": 0.5}, {}]
    with zl.per_sample_adapters(model, specs):
        got = run(model, inputs)
    for i, spec in enumerate(specs):
        zl.set_active_adapters(model, ["m", *spec], [1.0, *spec.values()])
        torch.testing.assert_close(got[i], run(model, pick(inputs, [i]))[0], rtol=1e-4, atol=1e-5)


def test_removing_a_named_adapter_inside_the_block_is_an_error(model):
    with zl.per_sample_adapters(model, [{"b": 1.0}, {}, {}, {}]):
        zl.remove_adapter(model, "b")
        with pytest.raises(zl.LoRAError, match="removed or replaced inside the block"):
            run(model, batch_inputs())


def test_quantized_base(tmp_path, one_torch_thread):
    pytest.importorskip("torchao", reason="torchao (the [quant] extra) is not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    m = tiny_model(0, **LONG)
    # Adapters are written against the dense weights (DoRA's magnitudes are norms of them).
    files = {name: make_adapter(layout, tmp_path / f"{name}.safetensors", m, seed=seed)
             for name, layout, seed in (("a", "diffusers", 1), ("k", "lycoris-lokr", 2), ("d", "lycoris-dora", 3))}
    fits = lambda mod, _n: isinstance(mod, torch.nn.Linear) and mod.in_features % 32 == 0  # noqa: E731
    quantize_(m, Int8WeightOnlyConfig(), filter_fn=fits)
    assert any(type(mod.weight) is not torch.nn.Parameter for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    for name, path in files.items():
        zl.apply_adapter(m, path, name=name)
    check_batch(m, batch_inputs(), [{"a": 1.0}, {"k": 1.0, "d": 0.5}, {}, {"d": 1.0}])


def test_guidance_doubles_the_batch_and_specs_follow_each_prompt(tmp_path, one_torch_thread):
    from _tiny_pipeline import tiny_pipeline

    pipe = tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    clean = tiny_pipeline(0).transformer
    for name, seed in (("a", 1), ("b", 2)):
        zl.apply_adapter(pipe, make_adapter("diffusers", tmp_path / f"{name}.safetensors", clean, seed=seed), name=name)
    prompts = ["a red cat", "a blue house at dusk", "the sea"]
    specs = [{"a": 1.0}, {"b": 0.8}, {}]
    kw = dict(height=32, width=32, num_inference_steps=2, guidance_scale=3.0, output_type="latent")

    def one(i: int, spec: dict) -> torch.Tensor:
        zl.set_active_adapters(pipe, list(spec), list(spec.values()))
        gen = torch.Generator().manual_seed(10 + i)
        return pipe(prompt=prompts[i], generator=gen, **kw).images[0]

    calls = []
    hook = pipe.transformer.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    with zl.per_sample_adapters(pipe, specs):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
        # A copy: diffusers' ZImagePipeline writes the chat-templated prompts back into the list it is given.
        got = pipe(prompt=list(prompts), generator=gens, **kw).images
    hook.remove()
    assert calls and all(c == 6 for c in calls), calls  # guidance really ran the doubled batch
    for i, spec in enumerate(specs):
        ref, base = one(i, spec), one(i, {})
        if spec:
            effect = float((ref - base).norm())
            assert effect > 1e-4
            assert float((got[i] - ref).norm()) / effect < 1e-4
        else:
            torch.testing.assert_close(got[i], base, rtol=1e-5, atol=1e-5)


def test_stacked_lora_with_different_ranks(model, tmp_path):
    # Rank 8 beside rank 4 ("b", "c"): the stacked form pads ranks with zeros.
    zl.apply_adapter(model, make_adapter("diffusers", tmp_path / "r8.safetensors", CLEAN, rank=8, seed=6), name="r8")
    check_batch(model, batch_inputs(), [{"r8": 1.0}, {"b": 1.0}, {"c": 0.5, "r8": -0.5}, {"b": 0.3}])

