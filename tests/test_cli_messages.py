"""Messages for the place they are read: on the command line an error is one `error:` line naming the
flag that fixes it; a model checkpoint given where an adapter belongs is named as such."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zimage_lora.cli import main
from zimage_lora.examples import make_adapter


@pytest.fixture(scope="module")
def turbo_lora(tmp_path_factory) -> Path:
    """A LoRA for the default model (Z-Image-Turbo names and shapes) with one key the model lacks."""
    path = tmp_path_factory.mktemp("turbo") / "turbo_style.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({
        "diffusion_model.layers.0.attention.to_q.lora_A.weight": torch.randn(2, 3840, generator=g),
        "diffusion_model.layers.0.attention.to_q.lora_B.weight": torch.randn(3840, 2, generator=g),
        "diffusion_model.not_a_block.proj.lora_A.weight": torch.randn(2, 8, generator=g),
        "diffusion_model.not_a_block.proj.lora_B.weight": torch.randn(8, 2, generator=g),
    }, str(path))
    return path


def test_strict_message_names_the_cli_fix(turbo_lora, capsys):
    assert main(["inspect", str(turbo_lora), "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "Run without --strict" in err and "strict=False" not in err


def test_strict_message_names_the_python_fix_in_python(turbo_lora):
    from zimage_lora import LoRAError, load_adapter

    with pytest.raises(LoRAError, match="strict=False"):
        load_adapter(turbo_lora, strict=True)


def test_ambiguous_folder_message_names_the_flag(tmp_path, tiny, capsys):
    make_adapter("kohya", tmp_path / "a.safetensors", tiny)
    make_adapter("kohya", tmp_path / "b.safetensors", tiny)
    assert main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "choose one with --filename NAME (or pass the file path itself)" in err and "filename=" not in err


@pytest.mark.parametrize(("library", "cli"), [
    ("Pass strict=False to apply the matched part.", "Run without --strict to apply the matched part."),
    ("use mode='dynamic' to keep it exact", "use --mode dynamic to keep it exact"),
])
def test_cli_spelling_of_library_fixes(library, cli):
    from zimage_lora.cli import cli_message

    assert cli_message(f"x.safetensors: something. {library}") == f"x.safetensors: something. {cli}"


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_model_checkpoint_given_as_adapter(tmp_path, tiny, tiny_config_file, prefix, capsys):
    path = tmp_path / "z_image_turbo_bf16.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in tiny.state_dict().items()}, str(path))
    assert main(["inspect", str(path), "--model", str(tiny_config_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "this is a model checkpoint, not an adapter" in err and "--model" in err
    from zimage_lora import InvalidFormatError, apply_adapter

    with pytest.raises(InvalidFormatError, match="this is a model checkpoint, not an adapter"):
        apply_adapter(tiny, path)


def test_diffusers_model_folder_given_as_adapter(tmp_path, tiny, capsys):
    tiny.save_pretrained(tmp_path / "transformer")
    assert main(["inspect", str(tmp_path / "transformer")]) == 1
    assert "this is a model checkpoint, not an adapter" in capsys.readouterr().err


def test_adapter_with_a_few_plain_weights_is_still_an_adapter(tmp_path, tiny):
    """A LoRA file that also carries a couple of full weights is not mistaken for a checkpoint."""
    from zimage_lora import load_adapter

    path = make_adapter("kohya", tmp_path / "k.safetensors", tiny)
    sd = load_file(str(path))
    sd["lora_unet_extra.weight"] = torch.zeros(4, 4)
    save_file(sd, str(path))
    adapter = load_adapter(path, tiny)
    assert len(adapter.modules) == 37 and any(u.key == "lora_unet_extra.weight" for u in adapter.unmatched)
