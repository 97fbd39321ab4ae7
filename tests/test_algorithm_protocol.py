"""The algorithm protocol's hooks for algorithms that read the base weight: a test-only module registered
here, and nothing else, runs merged and dynamic and matches a dense reference.

Two toys shaped like IA3 (LyCORIS `ia3`): dW = W * w per output row (dynamic mode: the base output
without bias, `wx`, times w) and dW = W * w per input column (dynamic mode: an input transform, the base
runs on x + s * (w * x)). The reference is computed here in float64 from W and w directly.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zimage_lora import Adapter, Target, algorithms, apply_adapter, remove_adapter, set_adapter_scale
from zimage_lora.algorithms.base import Algorithm, Kernel, amax

N_IN, N_OUT = 6, 8


def _mul_(rows: torch.Tensor, y: torch.Tensor, v: torch.Tensor, alpha) -> None:
    rows.add_(y * (v * alpha))


def _row_prepare(tensors, scale, placement, weight):
    w = placement.take(tensors["w"].float()) * scale
    return "toy_rows", {"w": w, "wmax": weight.abs().amax(dim=1)}  # |W| per row: for the overflow bound


def _col_prepare(tensors, scale, placement, weight):
    if not placement.whole:
        return None  # an input transform touches every row: the dense fallback instead
    return "toy_cols", {"w": tensors["w"].float() * scale, "wmax": weight.abs().max().reshape(1)}


def _algorithm(name: str, per_row: bool) -> Algorithm:
    def shape(s):
        return (s["w"][0], None) if per_row else (None, s["w"][0])

    def block(parts, lo, hi, weight=None):
        return weight * (parts["w"][lo:hi, None] if per_row else parts["w"][None, :])

    def whole(tensors, weight=None):
        return block({"w": tensors["w"].float()}, 0, weight.shape[0], weight)

    kernel = Kernel(
        name=name,
        add_=(lambda rows, x, wx, t, alpha: _mul_(rows, wx, t["w"], alpha)) if per_row
        else (lambda rows, x, wx, t, alpha: None),
        bound=lambda t: float((t["w"].double().abs() * t["wmax"].double()).max()) if per_row
        else amax(t["w"]) * amax(t["wmax"]),
        uses_wx=per_row,
        transform=None if per_row else (lambda x, t: x * t["w"]),
    )
    return Algorithm(
        name=name, family=name, priority=50, delta_shape=shape, rank=lambda s: None, delta=whole,
        bypass=lambda x, t, weight=None: x @ whole(t, weight).to(x.dtype).T,
        row_parts=lambda t: {"w": t["w"].float()}, delta_block=block,
        dynamic_numel=lambda s: s["w"][0], describe=lambda s: f"scale of {s['w'][0]}", needs_weight=True,
        prepare=_row_prepare if per_row else _col_prepare, kernels=(kernel,),
    )


@pytest.fixture(autouse=True)
def toys():
    for name, per_row in (("toy_rows", True), ("toy_cols", False)):
        algorithms.register(_algorithm(name, per_row))
    yield
    for name in ("toy_rows", "toy_cols"):
        algorithms.unregister(name)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(N_IN, N_OUT)
        with torch.no_grad():
            self.a.weight.copy_(torch.randn(N_OUT, N_IN, generator=g))
            self.a.bias.copy_(torch.randn(N_OUT, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def _adapter(algorithm: str, w: torch.Tensor, scale: float, rows=None) -> Adapter:
    target = Target(module="a", algorithm=algorithm, tensors={"w": w}, scale=scale, rows=rows)
    return Adapter(name="toy", format="test", source="test", targets=[target])


def _reference(model: Model, x: torch.Tensor, per_row: bool, w: torch.Tensor, s: float, rows=None) -> torch.Tensor:
    W = model.a.weight.detach().double()
    lo, hi = rows or (0, N_OUT)
    dW = torch.zeros_like(W)
    dW[lo:hi] = W[lo:hi] * (w.double()[:, None] if per_row else w.double()[None, :])
    return x.double() @ (W + s * dW).T + model.a.bias.detach().double()


CASES = {
    "per-row (wx)": ("toy_rows", True, N_OUT, None),
    "per-row on rows 2:5": ("toy_rows", True, 3, (2, 5)),
    "per-input (input transform)": ("toy_cols", False, N_IN, None),
    "per-input on rows 2:5 (dense fallback)": ("toy_cols", False, N_IN, (2, 5)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["merged", "dynamic"])
def test_toy_algorithm_matches_the_dense_reference(case, mode):
    algorithm, per_row, n, rows = CASES[case]
    model = Model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, N_IN, generator=torch.Generator().manual_seed(1))
    w = torch.randn(n, generator=torch.Generator().manual_seed(2))
    apply_adapter(model, _adapter(algorithm, w, 0.5, rows), mode=mode, name="toy", scale=0.8)
    with torch.no_grad():
        got = model(x).double()
    want = _reference(model if mode == "dynamic" else _base(before), x, per_row, w, 0.5 * 0.8, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    set_adapter_scale(model, "toy", -1.5)
    with torch.no_grad():
        got = model(x).double()
    want = _reference(model if mode == "dynamic" else _base(before), x, per_row, w, 0.5 * -1.5, rows)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    remove_adapter(model, "toy")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # restored exactly


def _base(state: dict[str, torch.Tensor]) -> Model:
    m = Model()
    m.load_state_dict(state)
    return m


def test_dynamic_overflow_bound_uses_the_algorithms_own_bound():
    """A strength that overflows fp32 through the toy's |W| * |w| bound is refused before anything changes."""
    from zimage_lora import LoRAError

    model = Model()
    w = torch.full((N_OUT,), 1e30)
    with pytest.raises(LoRAError, match="overflows"):
        apply_adapter(model, _adapter("toy_rows", w, 1.0), mode="dynamic", name="toy", scale=1e10)
    assert type(model.a) is nn.Linear


def test_registry_declares_priority_and_names():
    names = algorithms.names()
    assert {"lora", "lokr", "loha", "full", "toy_rows"} <= set(names)
    order = [a.name for a in algorithms.by_priority()]
    assert order.index("lokr") < order.index("loha") < order.index("lora") < order.index("full")


def test_a_strength_past_the_cheap_bound_is_checked_exactly():
    """LoRA's Cauchy-Schwarz bound is 2 here while the largest delta value is 1: a strength of 3e38
    passes the exact check (3e38 < fp32's 3.4e38) although bound * strength would overflow."""
    model = Model()
    down = torch.zeros(2, N_IN)
    down[:, :2] = torch.tensor([[1.0, 0.5], [-1.0, 0.5]])
    up = torch.zeros(N_OUT, 2)
    up[0] = 1.0  # delta row 0 = [0, 1, 0, ...]
    adapter = Adapter(name="l", format="test", source="test",
                      targets=[Target(module="a", algorithm="lora", tensors={"down": down, "up": up})])
    apply_adapter(model, adapter, mode="dynamic", name="l", scale=3e38)
    assert torch.isfinite(model(torch.eye(N_IN)[:1] * 0.5)).all()
