"""The pure algorithm functions against LyCORIS's functional implementations, and each bypass
against its own full delta."""

from __future__ import annotations

import pytest
import torch
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr

from zimage_lora import algorithms
from zimage_lora.algorithms.base import Reserved
from zimage_lora.placement import Placement

g = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=g)


CASES = {
    "lora": ("lora", {"down": r(4, 24), "up": r(18, 4)}),
    "lora-mid": ("lora", {"down": r(4, 24), "up": r(18, 4), "mid": r(4, 4)}),
    "lokr-full": ("lokr", {"w1": r(3, 4), "w2": r(6, 6)}),
    "lokr-factorized": ("lokr", {"w1": r(3, 4), "w2_a": r(6, 2), "w2_b": r(2, 6)}),
    "lokr-both-factorized": ("lokr", {"w1_a": r(3, 2), "w1_b": r(2, 4), "w2_a": r(6, 2), "w2_b": r(2, 6)}),
    "lokr-tucker": ("lokr", {"w1": r(3, 4), "w2_a": r(2, 6), "w2_b": r(2, 6), "t2": r(2, 2)}),
    "loha": ("loha", {"w1_a": r(18, 3), "w1_b": r(3, 24), "w2_a": r(18, 3), "w2_b": r(3, 24)}),
    "loha-tucker": ("loha", {"w1_a": r(3, 18), "w1_b": r(3, 24), "t1": r(3, 3),
                             "w2_a": r(3, 18), "w2_b": r(3, 24), "t2": r(3, 3)}),
    "full": ("full", {"diff": r(18, 24)}),
}


def lycoris_delta(name: str, t: dict) -> torch.Tensor:
    if name.startswith("lora"):
        mid = t.get("mid")
        return ly_locon.diff_weight(t["down"], t["up"], mid, gamma=1.0, backend="torch")
    if name.startswith("lokr"):
        # LyCORIS's diff_weight divides gamma by `w?_a.shape[1]` (the rank, or out2 for tucker factors);
        # pass that as gamma to get the unscaled delta.
        a = t.get("w1_a", t.get("w2_a"))
        rank = a.shape[1] if a is not None else 1
        weights = (t.get("w1"), t.get("w1_a"), t.get("w1_b"), t.get("w2"), t.get("w2_a"), t.get("w2_b"), t.get("t2"))
        gamma = float(rank) if ("w1_a" in t or "w2_a" in t) else 1.0
        return ly_lokr.diff_weight(*weights, gamma=gamma, backend="torch")
    if name.startswith("loha"):
        return ly_loha.diff_weight(
            t["w1_b"], t["w1_a"], t["w2_b"], t["w2_a"], t.get("t1"), t.get("t2"), gamma=1.0, backend="torch"
        )
    return t["diff"]


@pytest.mark.parametrize("name", [n for n in CASES if n != "full"])
def test_delta_matches_lycoris_functional(name):
    algo, tensors = CASES[name]
    torch.testing.assert_close(algorithms.delta(algo, tensors), lycoris_delta(name, tensors).float())


@pytest.mark.parametrize("name", list(CASES))
def test_bypass_equals_x_times_delta(name):
    algo, tensors = CASES[name]
    x = r(5, 7, 24)
    expected = x @ algorithms.delta(algo, tensors).T
    torch.testing.assert_close(algorithms.bypass(algo, x, tensors), expected, rtol=1e-4, atol=1e-4)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert algorithms.delta_shape(algo, shapes) == (18, 24)


def test_lokr_kron_apply_never_needs_the_product():
    w1, w2 = r(40, 60), r(96, 64)  # kron would be 3840 x 3840
    x = r(3, 60 * 64)
    y = algorithms.lokr.kron_apply(x, w1, w2)
    torch.testing.assert_close(y, x @ torch.kron(w1, w2).T, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "algo,shapes,message",
    [
        ("lora", {"down": (4, 24), "up": (18, 5)}, "rank mismatch"),
        ("lokr", {"w1": (3, 4)}, "w2"),
        ("loha", {"w1_a": (18, 3), "w1_b": (3, 24), "w2_a": (10, 3), "w2_b": (3, 24)}, "disagree"),
        ("lora", {"down": (4, 24, 3), "up": (18, 4)}, "2-D"),
    ],
)
def test_inconsistent_shapes_are_reported(algo, shapes, message):
    with pytest.raises(ValueError, match=message):
        algorithms.delta_shape(algo, shapes)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("lo,hi", [(0, 18), (0, 1), (5, 11), (17, 18)])
def test_row_blocks_equal_rows_of_the_full_delta(name, lo, hi):
    algo, tensors = CASES[name]
    module = algorithms.get(algo)
    block = module.delta_block(module.row_parts(tensors), lo, hi)
    torch.testing.assert_close(block, algorithms.delta(algo, tensors)[lo:hi], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in CASES if n != "lora-mid"])  # LoRA's estimate counts mid, folded when run
def test_dynamic_memory_estimate_is_what_dynamic_mode_holds(name):
    algo, tensors = CASES[name]
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    n_out = algorithms.delta_shape(algo, shapes)[0]
    _kind, prepared = algorithms.kernel_inputs(algo, tensors, 1.0, Placement(0, n_out, 0, n_out), lambda: None)
    assert algorithms.get(algo).dynamic_numel(shapes) == sum(t.numel() for t in prepared.values())


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("lo,hi", [(0, 18), (6, 12)])
def test_prepared_kernel_adds_the_scaled_delta_rows(name, lo, hi):
    """Each dynamic kernel (or the dense fallback) on delta rows [lo, hi) adds x @ (s * delta[lo:hi]).T."""
    algo, tensors = CASES[name]
    _kind, prepared = algorithms.kernel_inputs(algo, tensors, 0.5, Placement(0, hi - lo, lo, hi - lo), lambda: None)
    x = r(5, 24)
    out = torch.zeros(5, hi - lo)
    algorithms.kernel(_kind).add_(out, x, None, prepared, 2.0)
    torch.testing.assert_close(out, x @ (algorithms.delta(algo, tensors)[lo:hi] * 1.0).T, rtol=1e-4, atol=1e-4)
    biggest = float((algorithms.delta(algo, tensors)[lo:hi].double() * 0.5).abs().max())
    assert algorithms.kernel(_kind).bound(prepared) >= biggest * (1 - 1e-6)  # fp32 rounding of the delta


def test_reserved_names_are_their_strings():
    # Reserved is a str Enum without enum.StrEnum (Python 3.11+; the package supports 3.10): a member
    # must still print, format, compare and hash as its value, as the dispatcher's dict keys rely on.
    for member, text in ((Reserved.BIAS, "bias"), (Reserved.DORA_FM1, "fm1")):
        assert (str(member), f"{member}", f"{member:>5}") == (text, text, f"{text:>5}")
        assert member == text and {text: 1}[member] == 1
