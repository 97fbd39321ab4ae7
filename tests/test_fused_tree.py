"""Split adapters on a fused-qkv module tree (ComfyUI's native layout) land on row slices of qkv."""

from __future__ import annotations

import torch
from _deltas import resolved_deltas
from torch import nn

from zimage_lora import examples, load_adapter


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(d // 2)
        self.k_norm = nn.RMSNorm(d // 2)


class _FeedForward(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, h, bias=False)
        self.w2 = nn.Linear(h, d, bias=False)
        self.w3 = nn.Linear(d, h, bias=False)


class _Block(nn.Module):
    def __init__(self, d: int, h: int, modulation: bool = True) -> None:
        super().__init__()
        self.attention = _Attention(d)
        self.feed_forward = _FeedForward(d, h)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(d, 4 * d))


class _Final(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 64)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, d))


class NativeZImage(nn.Module):
    """Module names of the original Tongyi-MAI / ComfyUI Z-Image tree, at the tiny width."""

    def __init__(self, d: int = 64, h: int = 170, n_layers: int = 2) -> None:
        super().__init__()
        self.x_embedder = nn.Linear(64, d)
        self.final_layer = _Final(d)
        self.layers = nn.ModuleList(_Block(d, h) for _ in range(n_layers))
        self.noise_refiner = nn.ModuleList([_Block(d, h)])
        self.context_refiner = nn.ModuleList([_Block(d, h, modulation=False)])


def test_split_files_land_on_qkv_rows(tmp_path, tiny):
    native = NativeZImage()
    for layout in ("kohya", "ai-toolkit", "lycoris-lokr-factorized", "lycoris-loha"):
        path = examples.make_adapter(layout, tmp_path / f"{layout}.safetensors", tiny, seed=4)
        split = resolved_deltas(load_adapter(path, tiny), tiny)
        fused_adapter = load_adapter(path, native)
        rows = {t.label for t in fused_adapter.targets if t.module.endswith("attention.qkv")}
        assert rows == {f"layers.0.attention.qkv[{a}:{b}]" for a, b in ((0, 64), (64, 128), (128, 192))} | {
            f"{blk}.attention.qkv[{a}:{b}]" for blk in ("layers.1", "noise_refiner.0", "context_refiner.0")
            for a, b in ((0, 64), (64, 128), (128, 192))
        }
        fused = resolved_deltas(fused_adapter, native)
        for blk in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"):
            qkv = torch.cat([split[f"{blk}.attention.{p}"] for p in ("to_q", "to_k", "to_v")])
            torch.testing.assert_close(fused[f"{blk}.attention.qkv"], qkv)
            torch.testing.assert_close(fused[f"{blk}.attention.out"], split[f"{blk}.attention.to_out.0"])
        torch.testing.assert_close(fused["x_embedder"], split["all_x_embedder.2-1"])
        torch.testing.assert_close(fused["final_layer.linear"], split["all_final_layer.2-1.linear"])


def test_fused_file_on_fused_tree_is_direct(tmp_path, tiny):
    native = NativeZImage()
    path = examples.make_adapter("comfy-fused", tmp_path / "f.safetensors", tiny, seed=5)
    adapter = load_adapter(path, native)
    qkv = [t for t in adapter.targets if t.module == "layers.0.attention.qkv"]
    assert len(qkv) == 1 and qkv[0].rows is None and qkv[0].tensors["up"].shape == (192, 4)
    # Embedders and refiners of the diffusers model are absent in this tree: reported, not dropped.
    assert {u.key.split(".lora")[0] for u in adapter.unmatched} >= {"diffusion_model.t_embedder.mlp.0"}
