"""Single-file `merge --layout comfyui|diffusers`: the key layout the user names, default the input's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_convert_targets import comfyui_native_params

from zimage_lora import LoRAError
from zimage_lora.cli import main
from zimage_lora.examples import make_adapter, tiny_model
from zimage_lora.tools.checkpoint_merge import merge_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_network")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = tiny_model(seed=1)
    folder = root / "transformer"
    model.save_pretrained(folder, max_shard_size="60KB")  # shards: q, k and v may sit in different files
    lora = make_adapter("kohya", root / "k.safetensors", model, rank=4, alpha=2.0)
    return model, folder, lora


def test_layout_comfyui_writes_comfyuis_native_fused_checkpoint(base, tmp_path):
    model, folder, lora = base
    same = load_file(str(merge_checkpoint(folder, [f"{lora}:0.7"], tmp_path / "same.safetensors").out))
    assert "layers.0.attention.to_q.weight" in same  # the default keeps the input's (diffusers) names
    out = tmp_path / "comfy.safetensors"
    assert main(["merge", "--model", str(folder), "--lora", f"{lora}:0.7", "--out", str(out), "--quiet",
                 "--layout", "comfyui"]) == 0
    comfy = load_file(str(out))
    # Exactly the state dict of ComfyUI's own Z-Image model (comfy/utils.py z_image_to_diffusers, 3cd7b32) ...
    params = comfyui_native_params(model)
    assert set(comfy) == set(params.values()) | {"x_pad_token", "cap_pad_token"}
    # ... holding the same merged values: q, k, v stacked in that order.
    for block in ("layers.0", "noise_refiner.0", "context_refiner.0"):
        fused = torch.cat([same[f"{block}.attention.to_{p}.weight"] for p in "qkv"])
        assert torch.equal(comfy[f"{block}.attention.qkv.weight"], fused)
    for diffusers, native in params.items():
        if ".attention.to_" not in diffusers or "to_out" in diffusers:
            assert torch.equal(comfy[native], same[diffusers]), diffusers
    # And back: --layout diffusers from the ComfyUI file gives the diffusers file again, bit for bit.
    back = load_file(str(merge_checkpoint(out, [f"{lora}:0"], tmp_path / "back.safetensors",
                                          layout="diffusers").out))
    assert back.keys() == same.keys()
    assert all(torch.equal(back[k], same[k]) for k in back)


def test_layout_is_for_single_files(base, tmp_path, capsys):
    _model, folder, lora = base
    with pytest.raises(LoRAError, match="applies to a single-file output"):
        merge_checkpoint(folder, [lora], tmp_path / "out_dir", layout="comfyui")
    assert not (tmp_path / "out_dir").exists()
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    assert "default: the input's own" in " ".join(capsys.readouterr().out.split())
