"""The `format` label names the writer the evidence points to, or says it is unknown and what it saw;
never a trainer that cannot have written the file (the demo's example files included)."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from zimage_lora import examples, load_adapter
from zimage_lora.formats.trainer_meta import ConfigSource, MusubiLoKr, OFTConstraint
from zimage_lora.keys.scales import AlphaFrom


def _label(tmp_path, tiny, example: str) -> str:
    return load_adapter(examples.make_adapter(example, tmp_path / f"{example}.safetensors", tiny), tiny).format


def test_demo_rows_are_labelled_by_their_writer(tmp_path, tiny):
    musubi = _label(tmp_path, tiny, "musubi-other")
    assert "musubi-tuner convert_lora.py --target other" in musubi and "ai-toolkit" not in musubi
    onetrainer = _label(tmp_path, tiny, "onetrainer-comfy")
    assert "OneTrainer's COMFY output" in onetrainer and onetrainer != "comfyui"
    assert _label(tmp_path, tiny, "ai-toolkit-lokr") == "ai-toolkit (lycoris)"


def test_mflux_metadata_names_mflux_whatever_the_prefix(tmp_path, tiny):
    layer = tiny.get_submodule("layers.0.attention.to_q")
    sd = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.randn(2, layer.in_features),
          "transformer.layers.0.attention.to_q.lora_B.weight": torch.randn(layer.out_features, 2)}
    path = tmp_path / "mflux.safetensors"
    save_file(sd, str(path), metadata={"mflux_version": "0.13.0", "model": "z-image-turbo"})
    assert load_adapter(path, tiny).format == "mflux"


def test_lycoris_factors_without_evidence_are_an_unknown_writer(tmp_path, tiny):
    layer = tiny.get_submodule("layers.0.attention.to_q")
    sd = {"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.randn(8, 8),
          "diffusion_model.layers.0.attention.to_q.lokr_w2": torch.randn(layer.out_features // 8,
                                                                         layer.in_features // 8)}
    path = tmp_path / "bare.safetensors"
    save_file(sd, str(path))
    label = load_adapter(path, tiny).format
    assert label.startswith("unknown writer") and "diffusion_model." in label


def test_trainer_facts_are_typed(tmp_path, tiny):
    """What changes numbers is a type on the file and on each scale, not display text."""
    from zimage_lora.formats.reader import read_adapter_file
    from zimage_lora.keys.scales import scale_for

    kohya = examples.make_adapter("kohya", tmp_path / "k.safetensors", tiny)
    file = read_adapter_file(kohya)
    assert file.meta.peft is None and file.meta.musubi_lokr is None
    assert file.meta.oft_constraint is OFTConstraint.LYCORIS
    assert {scale_for(file, g).source for g in file.groups} == {AlphaFrom.KEY}
    folder = examples.make_adapter("peft", tmp_path / "p", tiny, rank=4, alpha=8)
    file = read_adapter_file(folder / "adapter_model.safetensors", {"lora_alpha": 8, "r": 4})
    assert file.meta.peft is not None and file.meta.peft.source is ConfigSource.PEFT_CONFIG
    assert {scale_for(file, g).source for g in file.groups} == {AlphaFrom.PEFT_CONFIG}
    assert MusubiLoKr("0b2d692") is MusubiLoKr.FIRST
