"""LyCORIS 4.1.3 networks on a one-Linear model, saved with LyCORIS's own `save_weights`, and the
comparisons of our algorithm functions with its modules (for `test_lycoris_extra.py` and
`test_lycoris_boft_ia3.py`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

lycoris = pytest.importorskip("lycoris", reason="LyCORIS is not installed (pip install lycoris-lora)")

logging.getLogger("lycoris").setLevel(logging.ERROR)
OUT, IN = 64, 48
PREFIX = "lycoris_layer."  # LycorisNetwork.LORA_PREFIX + "_" + the module's path with "." -> "_"
STRENGTHS = (1.0, 0.5, -1.3)


class OneLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(IN, OUT, bias=True)


@pytest.fixture(autouse=True)
def _keep_presets(monkeypatch):
    """LyCORIS presets set class attributes of LycorisNetwork; put them back after each test."""
    for name in ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
                 "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(lycoris.LycorisNetwork, name, getattr(lycoris.LycorisNetwork, name))


def _network(tmp_path, algo: str, dim: int, alpha: float, seed: int, fill=None, **kwargs):
    """(model, LyCORIS module, file tensors with the prefix stripped)."""
    torch.manual_seed(seed)
    model = OneLinear()
    with torch.no_grad():
        model.layer.weight.normal_(0, 0.5)
        model.layer.bias.normal_(0, 0.5)
    net = lycoris.create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, algo=algo, **kwargs)
    net.apply_to()
    assert len(net.loras) == 1
    module = net.loras[0]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if fill is not None and name in fill:
                p.fill_(fill[name])
            else:
                p.normal_(0, 0.3)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, None)
    saved = load_file(str(path))
    assert all(k.startswith(PREFIX) for k in saved), sorted(saved)
    return model, module, {k[len(PREFIX) :]: v for k, v in saved.items()}


def _close(ours: torch.Tensor, ref: torch.Tensor, atol: float = 0.0) -> None:
    ref = ref.detach().float()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=max(atol, 1e-5 * float(ref.abs().max())))


def _lycoris_delta_out(model, module, x: torch.Tensor, strength: float, bypass: bool = False) -> torch.Tensor:
    """LyCORIS's forward at `strength` minus the plain layer's output."""
    w, b = model.layer.weight, model.layer.bias
    with torch.no_grad():
        module.multiplier = strength
        y = module.bypass_forward(x, strength) if bypass else model.layer(x)
        return y - torch.nn.functional.linear(x, w, b)


def _plain(model):
    """The layer's own forward: after `apply_to`, `model.layer(x)` runs LyCORIS's wrapper instead."""
    w, b = model.layer.weight.detach(), model.layer.bias.detach()
    return lambda x: torch.nn.functional.linear(x, w, b)


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Rows:
    """The part of `zimage_lora.placement.Placement` that `prepare` reads: delta rows [d0, d0 + n)."""

    d0: int = 0
    n: int = OUT

    @property
    def whole(self) -> bool:
        return self.d0 == 0 and self.n == OUT


def _row_blocks(mod, tensors, weight: torch.Tensor) -> torch.Tensor:
    """The delta a row block at a time, each block from the same rows of W (cuts at `row_align`)."""
    align = mod.row_align(tensors) if hasattr(mod, "row_align") else 1
    cuts = sorted({min(OUT, c * align) for c in (0, 1, 3, 5)} | {OUT}) if align < OUT else [0, OUT]
    if align == 1:
        cuts = [0, 7, 20, 41, OUT]
    parts = mod.row_parts(tensors)
    pieces = [mod.delta_block(parts, lo, hi, weight=weight[lo:hi]) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)]
    return torch.cat(pieces)


def _kernel_out(add_, x, w, t, alpha: float = 1.0) -> torch.Tensor:
    """What a `uses_wx` kernel adds to zero rows, with wx = x @ W_rows^T (no bias)."""
    x2 = x.reshape(-1, IN)
    wx = x2 @ w.T
    rows = torch.zeros_like(wx)
    add_(rows, x2, wx, t, alpha)
    return rows.reshape(*x.shape[:-1], w.shape[0])


OFT_CASES = [(0.0, False), (0.0, True), (0.05, False), (0.05, True), (1e-4, False)]


def _bias_term(mod, t, model) -> torch.Tensor:
    """What LyCORIS's bypass adds on top of the merge: the rotation of the bias, delta(b) for W = b."""
    b = model.layer.bias.detach()
    return mod.delta(t, b.reshape(-1, 1)).reshape(-1)
