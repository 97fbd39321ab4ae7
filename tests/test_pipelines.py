"""Every Z-Image pipeline class takes adapters: apply_adapter, Adapters and generate, built offline.

ControlNet pipelines carry a ControlNet that shares some modules with the transformer; adapters go to
the transformer and text encoder only. The Omni transformer has a SigLIP refiner, which DiffSynth's
Omni-Base LoRAs train: those keys land on an Omni transformer and find no module on a Turbo one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _apply_util import Pristine
from _pipeline_files import TE_TARGETS, TR_TARGETS, factors, te_output, token_inputs, write
from _tiny_pipeline import PIPELINES, save_tiny_pipeline, tiny_pipeline
from PIL import Image
from safetensors.torch import save_file

from zimage_lora import Adapters, apply_adapter, list_adapters
from zimage_lora.apply import AdapterLinear
from zimage_lora.tools.generate import generate, load_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _both(tmp_path, pipe, seed=0):
    te_f = factors(pipe.text_encoder, TE_TARGETS, seed)
    tr_f = factors(pipe.transformer, TR_TARGETS, seed + 100)
    return write(tmp_path / f"both_{seed}.safetensors", "kohya", te_f, tr_f)


def _own(controlnet: torch.nn.Module, transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The ControlNet's own tensors (not the modules it borrows from the transformer)."""
    shared = {id(p) for p in transformer.parameters()}
    return {k: v.detach().clone() for k, v in controlnet.named_parameters() if id(v) not in shared}


@pytest.mark.parametrize("kind", PIPELINES)
@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_every_pipeline_class_takes_adapters_on_transformer_and_text_encoder(tmp_path, kind, mode):
    pipe = tiny_pipeline(seed=0, kind=kind)
    assert type(pipe).__name__ == kind
    inputs = token_inputs(pipe.text_encoder.config.vocab_size)
    te_base = te_output(pipe.text_encoder, inputs)
    pristine = [Pristine(pipe.transformer), Pristine(pipe.text_encoder)]
    controlnet = getattr(pipe, "controlnet", None)
    own = _own(controlnet, pipe.transformer) if controlnet is not None else {}
    handle = Adapters(pipe)

    report = handle.load(_both(tmp_path, pipe), "style", mode=mode, scale=0.8)

    assert set(report.parts) == {"transformer", "text_encoder"}
    assert report.modules == list(TR_TARGETS) + ["text_encoder." + n for n in TE_TARGETS]
    assert not torch.equal(te_output(pipe.text_encoder, inputs), te_base)
    assert [(a.name, a.components) for a in handle.list()] == [("style", ("transformer", "text_encoder"))]
    if controlnet is not None:
        assert own and all(torch.equal(v, _own(controlnet, pipe.transformer)[k]) for k, v in own.items())
        assert not any(isinstance(m, AdapterLinear) for m in controlnet.modules())
    handle.unload()
    for snapshot, module in zip(pristine, (pipe.transformer, pipe.text_encoder), strict=True):
        snapshot.assert_same(module)


def _diffsynth_omni(path, transformer_like) -> tuple:
    """DiffSynth-Studio's Omni-Base LoRA layout: bare module names, PEFT's `.default` segment, no alpha
    (its training module saves the PEFT state dict of the DiT with names as the model has them)."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    expect = {}
    for name in ("siglip_refiner.0.attention.to_q", "siglip_refiner.0.feed_forward.w1", "layers.0.attention.to_k"):
        m = transformer_like.get_submodule(name)
        down = torch.randn(4, m.in_features, generator=g) / m.in_features**0.5
        up = torch.randn(m.out_features, 4, generator=g) * 0.1
        sd[f"{name}.lora_A.default.weight"], sd[f"{name}.lora_B.default.weight"] = down, up
        expect[name] = up @ down
    save_file(sd, str(path))
    return path, expect


def test_omni_siglip_refiner_keys_land_on_omni_and_find_no_module_on_turbo(tmp_path):
    omni, turbo = tiny_pipeline(kind="ZImageOmniPipeline"), tiny_pipeline(kind="ZImagePipeline")
    assert omni.transformer.config.siglip_feat_dim is not None and turbo.transformer.siglip_refiner is None
    path, expect = _diffsynth_omni(tmp_path / "omni_base.safetensors", omni.transformer)
    before = {n: omni.transformer.get_submodule(n).weight.detach().clone() for n in expect}

    report = apply_adapter(omni, path, mode="merged")
    assert sorted(report.modules) == sorted(expect) and report.unmatched == []
    for name, delta in expect.items():
        got = omni.transformer.get_submodule(name).weight
        assert torch.allclose(got, before[name] + delta, atol=1e-6, rtol=0), name

    report = apply_adapter(turbo, path)
    assert report.modules == ["layers.0.attention.to_k"]
    siglip = [u for u in report.unmatched if u.key.startswith("siglip_refiner.")]
    assert len(siglip) == 4 == len(report.unmatched)
    assert all("no such module 'siglip_refiner.0." in u.reason for u in siglip)


@pytest.mark.parametrize("kind", ["ZImageControlNetInpaintPipeline", "ZImageOmniPipeline"])
def test_generate_loads_the_folder_s_own_pipeline_class(tmp_path, kind, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = save_tiny_pipeline(tmp_path / "pipe", kind=kind)
    pipe = load_pipeline(folder, torch.float32)
    assert type(pipe).__name__ == kind


@pytest.mark.parametrize("kind", PIPELINES)
def test_generate_with_a_text_encoder_adapter_on_every_pipeline_class(tmp_path, kind):
    pipe = tiny_pipeline(seed=0, kind=kind)
    te_only = write(tmp_path / "te.safetensors", "comfyui", factors(pipe.text_encoder, TE_TARGETS, 0), None)
    args = dict(steps=2, width=32, height=32, dtype="fp32", device="cpu", seed=3, pipeline=pipe)
    base = generate("a red cat at dusk", [], out=tmp_path / "base.png", **args)
    styled = generate("a red cat at dusk", [f"{te_only}:4"], out=tmp_path / "te.png", **args)
    assert [r.modules for r in styled.adapters] == [["text_encoder." + n for n in TE_TARGETS]]
    assert list_adapters(pipe) == []  # generate removes what it applied from a pipeline it was given
    a, b = (np.asarray(Image.open(r.out)).astype(np.int16) for r in (base, styled))
    assert a.shape == (32, 32, 3) and np.abs(a - b).mean() > 0.5
