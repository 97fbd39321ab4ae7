"""The writing hooks of the algorithm protocol (canonical, fold_scale, fuse_rows), checked against
deltas built independently here from the factors."""

from __future__ import annotations

import math

import pytest
import torch

from zimage_lora import algorithms
from zimage_lora.errors import UnsupportedError

g = torch.Generator().manual_seed(0)


def _r(*shape):
    return torch.randn(*shape, generator=g)


def test_lora_canonical_folds_mid_and_reads_rank():
    down, mid, up = _r(3, 8, 1, 1), _r(3, 3), _r(6, 3)  # a conv-style down, as LyCORIS LoCon saves it
    tensors, scale, rank = algorithms.get("lora").canonical({"down": down, "mid": mid, "up": up}, 0.5, None)
    assert set(tensors) == {"down", "up"} and (scale, rank) == (0.5, 3)
    expected = up @ mid @ down.reshape(3, 8)
    torch.testing.assert_close(tensors["up"] @ tensors["down"], expected)


def test_lokr_canonical_folds_full_factor_scale_into_w2():
    w1, w2 = _r(2, 2), _r(3, 4)
    tensors, scale, rank = algorithms.get("lokr").canonical({"w1": w1, "w2": w2}, 0.25, None)
    assert (scale, rank) == (1.0, None)
    torch.testing.assert_close(torch.kron(tensors["w1"], tensors["w2"]), 0.25 * torch.kron(w1, w2))
    kept, scale, _ = algorithms.get("lokr").canonical({"w1": w1, "w2": w2}, 1.0, None)
    assert scale == 1.0 and torch.equal(kept["w2"], w2)


@pytest.mark.parametrize("spread", [False, True])
def test_lora_fold_scale_means_the_scale_at_scale_one(spread):
    down, up = _r(2, 5), _r(4, 2)
    t = algorithms.get("lora").fold_scale({"down": down, "up": up}, 0.3, spread)
    torch.testing.assert_close(t["up"].float() @ t["down"].float(), 0.3 * up @ down)
    if spread:  # musubi-tuner's sqrt(alpha / rank) in each factor
        torch.testing.assert_close(t["down"], down * math.sqrt(0.3))


def test_fold_scale_default_refuses():
    with pytest.raises(UnsupportedError, match="without an alpha"):
        algorithms.get("lokr").fold_scale({"w1": _r(2, 2), "w2": _r(2, 2)}, 0.5, False)


def test_lora_fuse_rows_block_diagonal_with_different_scales():
    d = 4
    q = ({"down": _r(2, 6), "up": _r(d, 2)}, 0.5, 2)
    v = ({"down": _r(3, 6), "up": _r(d, 3)}, 2.0, 3)
    tensors, scale, rank = algorithms.get("lora").fuse_rows([q, None, v])
    assert (scale, rank) == (1.0, 5)
    fused = tensors["up"] @ tensors["down"]
    torch.testing.assert_close(fused[:d], 0.5 * q[0]["up"] @ q[0]["down"])
    assert torch.count_nonzero(fused[d:2 * d]) == 0
    torch.testing.assert_close(fused[2 * d:], 2.0 * v[0]["up"] @ v[0]["down"])


def test_lora_fuse_rows_shared_down_keeps_rank_and_scale():
    down = _r(2, 6)
    parts = [({"down": down, "up": _r(4, 2)}, 0.5, 2) for _ in range(3)]
    tensors, scale, rank = algorithms.get("lora").fuse_rows(parts)
    assert (scale, rank) == (0.5, 2) and tensors["down"] is down
    torch.testing.assert_close(tensors["up"], torch.cat([p[0]["up"] for p in parts]))


def test_full_fuse_rows_stacks_diffs_and_declines_without_one():
    a, c = _r(4, 6), _r(4, 6)
    tensors, scale, rank = algorithms.get("full").fuse_rows([({"diff": a}, 1.0, None), None, ({"diff": c}, 1.0, None)])
    assert (scale, rank) == (1.0, None)
    torch.testing.assert_close(tensors["diff"], torch.cat([a, torch.zeros(4, 6), c]))
    assert algorithms.get("full").fuse_rows([({"diff": a}, 1.0, None), ({}, 1.0, None), None]) is None
    assert algorithms.get("loha").fuse_rows([({}, 1.0, None)] * 3) is None
