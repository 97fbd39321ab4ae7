"""Saving and loading with adapters attached: dynamic mode is invisible to state_dict / load_state_dict /
save_pretrained / from_pretrained; merged mode saves the merged weights and nothing else."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from _apply_util import output
from safetensors.torch import load_file

from zimage_lora import Adapter, Target, apply_adapter, examples, remove_adapter
from zimage_lora.apply import AdapterLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    sd = model.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}, dict(sd._metadata)


def _assert_same_state(got: dict, want: dict) -> None:
    assert list(got) == list(want)  # same keys, same order
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def _wrapped(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    model = examples.tiny_model(seed=0)
    return {
        "lora": examples.make_adapter("kohya", tmp / "lora.safetensors", model, seed=1),
        "dora": examples.make_adapter("lycoris-dora", tmp / "dora.safetensors", model, seed=2),
        "full": examples.make_adapter("lycoris-full", tmp / "full.safetensors", model, seed=3),
    }


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_dynamic_state_dict_is_the_base_models(files, kind):
    model = examples.tiny_model(seed=0)
    want, want_meta = _snapshot(model)
    apply_adapter(model, files[kind], mode="dynamic", name="a")
    assert len(_wrapped(model)) > 30
    sd = model.state_dict()
    _assert_same_state(sd, want)
    assert dict(sd._metadata) == want_meta  # per-module versions too: no `base_layer` / `slots` entries
    # keep_vars hands out the model's own parameters under the base names
    params = dict(model.layers[0].attention.to_q.base_layer.named_parameters())
    assert model.state_dict(keep_vars=True)["layers.0.attention.to_q.weight"] is params["weight"]
    # a wrapped layer on its own, too
    assert list(model.layers[0].attention.to_q.state_dict()) == ["weight"]
    assert list(model.layers[0].adaLN_modulation[0].state_dict()) == ["weight", "bias"]


def test_save_pretrained_writes_the_base_checkpoint(files, tmp_path, caplog):
    from diffusers import ZImageTransformer2DModel

    model = examples.tiny_model(seed=0)
    want, _ = _snapshot(model)
    base_out = output(model)
    apply_adapter(model, files["lora"], mode="dynamic", name="a")
    model.save_pretrained(tmp_path / "saved")
    written = load_file(str(tmp_path / "saved" / "diffusion_pytorch_model.safetensors"))
    assert set(written) == set(want)  # no adapter tensors, no renamed keys
    assert all(torch.equal(written[k], v) for k, v in want.items())

    with caplog.at_level(logging.WARNING, logger="diffusers"):
        loaded = ZImageTransformer2DModel.from_pretrained(tmp_path / "saved").eval()
    assert "newly initialized" not in caplog.text and "not used" not in caplog.text, caplog.text
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(output(loaded), base_out)


def test_torch_save_roundtrip_and_strict_load(files):
    model = examples.tiny_model(seed=0)
    base_out = output(model)
    apply_adapter(model, files["lora"], mode="dynamic", name="a")
    with_adapter = output(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)

    plain = examples.tiny_model(seed=7)
    plain.load_state_dict(sd, strict=True)  # raises on any missing or unexpected key
    assert torch.equal(output(plain), base_out)
    result = model.load_state_dict(sd, strict=True)  # into the wrapped model: same weights back
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(output(model), with_adapter)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_load_state_dict_keeps_adapters_on_top(files, kind):
    """Loading other base weights into a wrapped model: the output is the new base plus the adapter."""
    other = examples.tiny_model(seed=5)
    new_sd = {k: v.clone() for k, v in other.state_dict().items()}
    apply_adapter(other, files[kind], mode="dynamic", name="a")
    expected = output(other)  # a fresh apply onto the new weights

    model = examples.tiny_model(seed=0)
    apply_adapter(model, files[kind], mode="dynamic", name="a")
    keys = list(new_sd)
    result = model.load_state_dict(new_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(new_sd) == keys  # the caller's dict is not changed
    assert len(_wrapped(model)) > 30
    torch.testing.assert_close(output(model), expected, rtol=0, atol=1e-6)
    remove_adapter(model)
    assert torch.equal(output(model), output(examples.tiny_model(seed=5)))


def test_load_state_dict_with_wrapper_keys_still_loads(files):
    """A state dict saved by an older version, with `...base_layer.weight` keys, still loads."""
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["lora"], mode="dynamic", name="a")
    wrapped = set(_wrapped(model))
    other = examples.tiny_model(seed=5).state_dict()
    old_style = {}
    for key, value in other.items():
        module, _, leaf = key.rpartition(".")
        old_style[f"{module}.base_layer.{leaf}" if module in wrapped else key] = value
    assert any(".base_layer." in k for k in old_style)
    model.load_state_dict(old_style, strict=True)
    _assert_same_state(model.state_dict(), other)


def test_merged_state_dict_is_the_merged_weights_only(files, tmp_path):
    """Merged mode saves the merged weights (a merged checkpoint); kept originals never appear."""
    model = examples.tiny_model(seed=0)
    want, want_meta = _snapshot(model)
    apply_adapter(model, files["lora"], mode="merged", name="m")
    apply_adapter(model, files["dora"], mode="dynamic", name="d")  # dynamic on top: still invisible
    sd = model.state_dict()
    assert list(sd) == list(want) and dict(sd._metadata) == want_meta
    changed = [k for k in want if not torch.equal(sd[k], want[k])]
    assert len(changed) > 30 and all(k.endswith(".weight") for k in changed)
    remove_adapter(model, "d")
    merged_out = output(model)
    plain = examples.tiny_model(seed=7)
    plain.load_state_dict(sd, strict=True)
    assert torch.equal(output(plain), merged_out)  # the saved state dict is the merged model
    remove_adapter(model)
    _assert_same_state(model.state_dict(), want)


def _same_entry(a, b) -> bool:
    return a is b or (type(a) is type(b) is torch.Tensor and torch.equal(a, b))


def _equal_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality, also for tensor subclasses (compared through their inner tensors)."""
    if hasattr(a, "__tensor_flatten__"):
        names, _ctx = a.__tensor_flatten__()
        return type(a) is type(b) and all(_equal_values(getattr(a, n), getattr(b, n)) for n in names)
    if hasattr(a, "as_tensor"):  # diffusers' GGUFParameter: the raw quantized bytes
        a, b = a.as_tensor(), b.as_tensor()
    return a.dtype == b.dtype and torch.equal(a, b)


def _check_quantized(model: torch.nn.Module, adapter, loads: bool = True) -> None:
    """Same state_dict entries (the very parameters) with the layers wrapped; the saved state loads back."""
    before = model.state_dict(keep_vars=True)
    before_meta = dict(before._metadata)
    saved = model.state_dict() if loads else None
    apply_adapter(model, adapter, mode="dynamic", name="a")
    assert len(_wrapped(model)) > 20
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    assert dict(after._metadata) == before_meta
    differ = [k for k in before if not _same_entry(after[k], before[k])]
    assert not differ, differ
    if loads:
        # The base layers' own loading, under the wrapper's prefix. Before any forward: bitsandbytes' int8
        # layer loads its scales only while they sit on the weight (a forward moves them), wrapped or not.
        model.load_state_dict(saved, strict=True)
        reloaded = model.state_dict()
        assert list(reloaded) == list(saved)
        changed = [k for k in saved if not _equal_values(reloaded[k], saved[k])]
        assert not changed, changed
        assert torch.isfinite(output(model)).all()


def test_quantized_torchao_keys_unchanged(tmp_path):
    pytest.importorskip("torchao", reason="torchao is in the [quant] extra")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = examples.tiny_model(seed=0)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _n: isinstance(m, torch.nn.Linear))
    adapter = examples.make_adapter("ai-toolkit", tmp_path / "a.safetensors", examples.tiny_model(0), rank=4)
    _check_quantized(model, adapter)


@pytest.mark.parametrize("kind", ["int8", "nf4-double"])
def test_quantized_bitsandbytes_keys_unchanged(tmp_path, kind):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [quant] extra")
    from _quant import replace_linears

    def make(_name, lin):
        if kind == "int8":
            new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      has_fp16_weights=False)
            new.weight = bnb.nn.Int8Params(lin.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
        else:
            new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                    quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
            new.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True)
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return new.to("cpu").eval()

    model = examples.tiny_model(seed=0)
    replace_linears(model, make)
    adapter = examples.make_adapter("ai-toolkit", tmp_path / "a.safetensors", examples.tiny_model(0), rank=4)
    # No forward runs on the 4-bit model: bitsandbytes' own state_dict of a CPU-repacked 4-bit weight is
    # unreliable (docs/backends.md); and its 4-bit layers load a state dict only through a quantizer.
    _check_quantized(model, adapter, loads=kind == "int8")


def test_quantized_gguf_keys_unchanged(tmp_path):
    pytest.importorskip("gguf", reason="gguf is in the [quant] extra")
    import gguf
    from _quant import load_gguf_model, write_gguf

    write_gguf(examples.tiny_model(0), tmp_path / "m.gguf", lambda k, t: gguf.GGMLQuantizationType.Q8_0
               if t.shape[1] % 32 == 0 else None)
    model = load_gguf_model(tmp_path / "m.gguf", tmp_path / "cfg")
    adapter = examples.make_adapter("ai-toolkit", tmp_path / "a.safetensors", examples.tiny_model(0), rank=4)
    _check_quantized(model, adapter)


def _norm_adapter(seed: int, name: str) -> Adapter:
    """Full diffs on norm layers: no dynamic form, so dynamic mode writes them into the weights."""
    g = torch.Generator().manual_seed(seed)
    targets = [
        Target(module, "full", {"diff": torch.randn(64, generator=g) * 0.1})
        for module in ("layers.0.attention_norm1", "layers.1.ffn_norm2", "context_refiner.0.attention_norm2")
    ]
    targets.append(Target("layers.0.attention.to_q", "full", {"diff": torch.randn(64, 64, generator=g) * 0.02}))
    return Adapter(name=name, format="test", source="test", targets=targets)


def test_dynamic_norm_patches_stay_out_of_state_dict():
    model = examples.tiny_model(seed=0)
    want, want_meta = _snapshot(model)
    base_out = output(model)
    apply_adapter(model, _norm_adapter(1, "n"), mode="dynamic", name="n")
    with_adapter = output(model)
    assert not torch.equal(model.layers[0].attention_norm1.weight, want["layers.0.attention_norm1.weight"])
    sd = model.state_dict()
    _assert_same_state(sd, want)
    assert dict(sd._metadata) == want_meta
    model.load_state_dict(sd, strict=True)  # a round trip changes nothing: the patches stay on top
    assert torch.equal(output(model), with_adapter)
    remove_adapter(model)
    _assert_same_state(model.state_dict(), want)
    assert torch.equal(output(model), base_out)


def test_load_state_dict_under_dynamic_norm_patches():
    other = examples.tiny_model(seed=5)
    new_sd, _ = _snapshot(other)
    apply_adapter(other, _norm_adapter(1, "n"), mode="dynamic", name="n")
    expected = output(other)

    model = examples.tiny_model(seed=0)
    apply_adapter(model, _norm_adapter(1, "n"), mode="dynamic", name="n")
    model.load_state_dict(new_sd, strict=True)
    assert torch.equal(output(model), expected)
    _assert_same_state(model.state_dict(), new_sd)
    remove_adapter(model)  # the loaded weights are the originals now
    _assert_same_state(model.state_dict(), new_sd)


def test_norm_patched_by_merged_and_dynamic():
    """On one norm layer, the saved value holds the merged adapter and not the dynamic one."""
    ref = examples.tiny_model(seed=0)
    apply_adapter(ref, _norm_adapter(2, "m"), mode="merged", name="m")
    want, _ = _snapshot(ref)

    model = examples.tiny_model(seed=0)
    pristine, _ = _snapshot(model)
    apply_adapter(model, _norm_adapter(2, "m"), mode="merged", name="m")
    apply_adapter(model, _norm_adapter(1, "n"), mode="dynamic", name="n")
    both = output(model)
    sd = model.state_dict()
    _assert_same_state(sd, want)
    model.load_state_dict(sd)
    assert torch.equal(output(model), both)
    remove_adapter(model)
    _assert_same_state(model.state_dict(), pristine)


def test_copies_save_and_load_on_their_own(files):
    """The hooks act on the model they are called on: a deep copy saves its base and loads on its own."""
    import copy

    model = examples.tiny_model(seed=0)
    want, _ = _snapshot(model)
    apply_adapter(model, _norm_adapter(1, "n"), mode="dynamic", name="n")
    apply_adapter(model, files["dora"], mode="dynamic", name="d")
    out = output(model)
    twin = copy.deepcopy(model)
    _assert_same_state(twin.state_dict(), want)
    new_sd, _ = _snapshot(examples.tiny_model(seed=5))
    twin.load_state_dict(new_sd)
    remove_adapter(twin)
    _assert_same_state(twin.state_dict(), new_sd)
    assert torch.equal(output(model), out)  # the original keeps its weights and adapters
    _assert_same_state(model.state_dict(), want)
