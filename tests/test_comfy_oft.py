"""ComfyUI-native OFT/BOFT files follow ComfyUI's constraint (||Q||_F <= alpha), not LyCORIS's
(alpha * out), in both modes, and `inspect` says which rule was used and where LyCORIS differs.

The file is what ComfyUI's train node saves (comfy_extras/nodes_train.py at 3cd7b32: the OFTDiff
parameters of every module under its native name, f"{module}.oft_blocks" and f"{module}.alpha" = 1.0,
no metadata); the expected weight is computed here from comfy/weight_adapter/oft.py's
`calculate_weight` at strength 1: Q = B - B^T scaled to norm alpha when ||Q|| + 1e-8 > alpha,
R = (I + Q)(I - Q)^-1, W + einsum("k n m, k n ... -> k m ...", R - I, W in blocks).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _apply_util import output, rel_err
from safetensors.torch import save_file

from zimage_lora import apply_adapter, load_adapter

# (ComfyUI's native name, the diffusers module it is)
MODULES = (("layers.0.attention.out", "layers.0.attention.to_out.0"),
           ("layers.1.adaLN_modulation.0", "layers.1.adaLN_modulation.0"))
B = 8


def _comfy_weight(w: torch.Tensor, blocks: torch.Tensor, alpha: float) -> torch.Tensor:
    q = blocks.double() - blocks.double().transpose(1, 2)
    norm = float(torch.norm(q)) + 1e-8
    if alpha > 0 and norm > alpha:
        q = q * alpha / norm
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    k, b, _ = blocks.shape
    diff = torch.einsum("knm,kn...->km...", r - eye, w.double().view(k, b, -1)).reshape(w.shape)
    return (w.double() + diff).float()


def _file(tiny, tmp_path, prefix="diffusion_model.", metadata=None):
    g = torch.Generator().manual_seed(3)
    sd, weights = {}, {}
    for native, name in MODULES:
        w = tiny.get_submodule(name).weight.detach()
        blocks = torch.randn(w.shape[0] // B, B, B, generator=g) * 0.5  # ||Q||_F well above alpha = 1
        key = prefix + (native if prefix.endswith(".") else native.replace(".", "_"))
        sd[f"{key}.oft_blocks"] = blocks
        sd[f"{key}.alpha"] = torch.tensor(1.0)
        weights[name] = _comfy_weight(w, blocks, 1.0)
    path = tmp_path / "comfy-oft.safetensors"
    save_file(sd, str(path), metadata=metadata)
    return path, weights


@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_comfyui_oft_uses_comfyuis_constraint(tiny, tmp_path, mode):
    path, weights = _file(tiny, tmp_path)
    ref = copy.deepcopy(tiny)
    with torch.no_grad():
        for name, w in weights.items():
            ref.get_submodule(name).weight.copy_(w)
    base, want = output(tiny), output(ref)
    apply_adapter(tiny, path, mode=mode, name="oft")
    assert rel_err(output(tiny), want, base) < 1e-5


def test_inspect_names_the_rule_and_where_lycoris_differs(tiny, tmp_path):
    path, _ = _file(tiny, tmp_path)
    adapter = load_adapter(path, tiny)
    note = next(n for n in adapter.notes if "ComfyUI's constraint" in n)
    assert "||Q||_F <= alpha (here 1;" in note and "LyCORIS bounds ||Q||_F by alpha * out (64, 256)" in note


def test_lycoris_metadata_keeps_lycoris_rule(tiny, tmp_path):
    """The same tensors named by LyCORIS (its prefix and metadata) keep alpha * out: nothing is clipped here."""
    path, _ = _file(tiny, tmp_path, prefix="lycoris_", metadata={"ss_network_module": "lycoris.kohya"})
    adapter = load_adapter(path, tiny)
    assert all("alpha" in t.tensors and "constraint" not in t.tensors for t in adapter.targets)
    assert not any("ComfyUI's constraint" in n for n in adapter.notes)


def test_convert_keeps_comfyuis_bound_as_lycoris_alpha(tiny, tmp_path):
    """The written layouts spell OFT as LyCORIS does: the bound becomes alpha = bound / out, the same rotation."""
    from zimage_lora.tools.convert import convert_adapter

    path, _ = _file(tiny, tmp_path)
    out = convert_adapter(load_adapter(path, tiny), "kohya", tmp_path / "k.safetensors")
    merged = {}
    for name, src in (("comfy", path), ("kohya", out)):
        m = copy.deepcopy(tiny)
        apply_adapter(m, src, mode="merged", name=name)
        merged[name] = output(m)
    assert not any("ComfyUI's constraint" in n for n in load_adapter(out, tiny).notes)
    torch.testing.assert_close(merged["kohya"], merged["comfy"], rtol=1e-5, atol=1e-5)
