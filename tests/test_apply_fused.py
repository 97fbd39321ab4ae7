"""Engine behaviour on fused targets: split files on a fused qkv layer, fused files on split layers, and
a fused kohya file against the split file it was made from (merged and dynamic)."""

from __future__ import annotations

import pytest
import torch
from _apply_util import TOL, Pristine, adapter_file, output, rel_err
from safetensors.torch import load_file, save_file
from torch import nn

from zimage_lora import apply_adapter, remove_adapter


class _Attention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        if fused:
            self.qkv = nn.Linear(64, 192)
        else:
            self.to_q, self.to_k, self.to_v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return self.qkv(x) if self.fused else torch.cat([self.to_q(x), self.to_k(x), self.to_v(x)], -1)


class _Tree(nn.Module):
    """Two blocks with only attention: the fused (ComfyUI) or split (diffusers) spelling of qkv."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attention": _Attention(fused)}) for _ in range(2))

    def forward(self, x):
        return torch.cat([blk["attention"](x) for blk in self.layers], -1)


def _twins(seed=0):
    torch.manual_seed(seed)
    fused, split = _Tree(True), _Tree(False)
    with torch.no_grad():
        for i in range(2):
            qkv = fused.layers[i]["attention"].qkv
            qkv.weight.normal_(0, 0.125)
            qkv.bias.normal_(0, 0.1)
            att = split.layers[i]["attention"]
            for j, part in enumerate((att.to_q, att.to_k, att.to_v)):
                part.weight.copy_(qkv.weight[64 * j : 64 * (j + 1)])
                part.bias.copy_(qkv.bias[64 * j : 64 * (j + 1)])
    return fused, split


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
@pytest.mark.parametrize("layout", ["kohya", "lycoris-lokr-factorized", "lycoris-loha", "lycoris-dora", "lycoris-full"])
def test_split_files_on_a_fused_qkv_tree(tmp_path, layout, mode):
    fused, split = _twins()
    x = torch.randn(5, 64)
    path = adapter_file(tmp_path, split, layout, seed=1)
    base = split(x)
    pristine = Pristine(fused)
    r_fused = apply_adapter(fused, path, mode=mode)
    assert any(a.endswith("attention.qkv[64:128]") for a in r_fused.applied)
    apply_adapter(split, path, mode=mode)
    assert rel_err(fused(x), split(x), base) < TOL
    remove_adapter(fused)
    pristine.assert_same(fused)


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
@pytest.mark.parametrize("algo", ["lora", "lokr", "loha", "full"])
def test_fused_qkv_file_on_split_layers(tmp_path, algo, mode):
    fused, split = _twins(1)
    g = torch.Generator().manual_seed(2)
    sd: dict[str, torch.Tensor] = {}
    for i in range(2):
        stem = f"diffusion_model.layers.{i}.attention.qkv"
        if algo == "lora":
            sd |= {f"{stem}.lora_A.weight": torch.randn(4, 64, generator=g) / 8,
                   f"{stem}.lora_B.weight": torch.randn(192, 4, generator=g) / 4, f"{stem}.alpha": torch.tensor(2.0)}
        elif algo == "lokr":
            sd |= {f"{stem}.lokr_w1": torch.randn(12, 8, generator=g) / 4,
                   f"{stem}.lokr_w2": torch.randn(16, 8, generator=g) / 4}
        elif algo == "loha":
            sd |= {f"{stem}.hada_w1_a": torch.randn(192, 2, generator=g) / 2,
                   f"{stem}.hada_w1_b": torch.randn(2, 64, generator=g) / 2,
                   f"{stem}.hada_w2_a": torch.randn(192, 2, generator=g) / 2,
                   f"{stem}.hada_w2_b": torch.randn(2, 64, generator=g) / 2, f"{stem}.alpha": torch.tensor(1.0)}
        else:
            sd |= {f"{stem}.diff": torch.randn(192, 64, generator=g) / 50,
                   f"{stem}.diff_b": torch.randn(192, generator=g)}
    path = tmp_path / f"fused-{algo}.safetensors"
    save_file(sd, str(path))
    x = torch.randn(5, 64)
    base = fused(x)
    pristine = Pristine(split)
    report = apply_adapter(split, path, mode=mode, scale=0.9)
    assert "layers.1.attention.to_v" in report.applied
    apply_adapter(fused, path, mode=mode, scale=0.9)  # direct on the fused tree: the reference
    assert rel_err(split(x), fused(x), base) < TOL
    remove_adapter(split)
    pristine.assert_same(split)


def test_fused_kohya_file_equals_the_split_file_it_was_made_from(tmp_path, tiny):
    fused_path = adapter_file(tmp_path, tiny, "kohya-fused", seed=3, rank=2, alpha=1.0)
    sd = load_file(str(fused_path))
    split: dict[str, torch.Tensor] = {}
    for key, value in sd.items():  # undo the block-diagonal packing by hand: q, k, v get their own factors
        if "_qkv." not in key:
            split[key] = value
            continue
        stem, suffix = key.split("_qkv.")
        for j, part in enumerate(("to_q", "to_k", "to_v")):
            name = f"{stem}_{part}.{suffix}"
            if suffix == "lora_down.weight":
                split[name] = value[2 * j : 2 * j + 2].contiguous()
            elif suffix == "lora_up.weight":
                split[name] = value[64 * j : 64 * j + 64, 2 * j : 2 * j + 2].contiguous()
            else:
                split[name] = value / 3  # alpha x3 over rank x3 -> same scale
    split_path = tmp_path / "split.safetensors"
    save_file(split, str(split_path))
    base = output(tiny)
    for mode in ("dynamic", "merged"):
        apply_adapter(tiny, split_path, mode=mode, name="s")
        ref = output(tiny)
        remove_adapter(tiny)
        apply_adapter(tiny, fused_path, mode=mode, name="f")
        assert rel_err(output(tiny), ref, base) < TOL
        remove_adapter(tiny)
