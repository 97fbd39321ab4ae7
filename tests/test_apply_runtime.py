"""Runtime behaviour: switching sets, the handle, quantized-style backends, torch.compile, threads."""

from __future__ import annotations

import threading

import pytest
import torch
from _apply_util import Pristine, output
from torch import nn

from zimage_lora import (
    Adapter,
    Adapters,
    Target,
    UnsupportedError,
    apply_adapter,
    examples,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)
from zimage_lora.apply import transaction, validate
from zimage_lora.backends import PlainLinearBackend


def _lora(names: list[str], dims: dict[str, tuple[int, int]], rank=2, seed=0, name="x") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    targets = [
        Target(n, "lora", {"down": torch.randn(rank, dims[n][1], generator=g) / 4,
                           "up": torch.randn(dims[n][0], rank, generator=g) / 4}, scale=0.5)
        for n in names
    ]
    return Adapter(name=name, format="test", source="test", targets=targets)


def _stack(n=3, width=16):
    torch.manual_seed(0)
    layers = []
    for _ in range(n):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers)


def _dims(model):
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _manual(model, adapter: Adapter, scale: float, x):
    """Reference forward: every targeted Linear computes W x + b + scale * s * B A x, written out by hand."""
    deltas = {t.module: t.scale * (t.tensors["up"] @ t.tensors["down"]) for t in adapter.targets}
    for name, module in model.named_children():
        if name in deltas:
            x = nn.functional.linear(x, module.weight, module.bias) + scale * x @ deltas[name].T
        else:
            x = module(x)
    return x


# --- switching and the handle -----------------------------------------------------------------------

def test_switching_active_sets_and_weights(tmp_path, tiny):
    a = examples.make_adapter("kohya", tmp_path / "a.safetensors", tiny, seed=1)
    b = examples.make_adapter("lycoris-lokr", tmp_path / "b.safetensors", tiny, seed=2)
    base = output(tiny)
    apply_adapter(tiny, a, name="a", scale=0.5)
    only_a = output(tiny)
    apply_adapter(tiny, b, name="b", mode="merged", scale=0.25)
    both = output(tiny)
    set_active_adapters(tiny, ["a"])
    assert torch.allclose(output(tiny), only_a, atol=1e-6)
    assert [x.active for x in list_adapters(tiny)] == [True, False]
    set_active_adapters(tiny, [])
    assert torch.equal(output(tiny), base)
    set_active_adapters(tiny, ["a", "b"], [0.5, 0.25])
    assert torch.allclose(output(tiny), both, atol=1e-6)
    remove_adapter(tiny)


def test_handle_fuse_unfuse_disable(tmp_path, tiny):
    pristine = Pristine(tiny)
    path = examples.make_adapter("lycoris-loha", tmp_path / "h.safetensors", tiny, seed=3)
    base = output(tiny)
    handle = Adapters(tiny)
    handle.load(path, "h", scale=0.7)
    dynamic = output(tiny)
    handle.fuse()
    assert handle.list()[0].mode == "merged"
    assert not any(type(m).__name__ == "AdapterLinear" for m in tiny.modules())
    torch.testing.assert_close(output(tiny), dynamic, rtol=1e-5, atol=1e-5)
    with handle.disabled():
        assert torch.equal(output(tiny), base)
    torch.testing.assert_close(output(tiny), dynamic, rtol=1e-5, atol=1e-5)
    handle.unfuse("h")
    assert handle.list()[0].mode == "dynamic"
    handle.set_adapters("h", 0.0)
    assert torch.equal(output(tiny), base)
    handle.unload()
    pristine.assert_same(tiny)


# --- backends ---------------------------------------------------------------------------------------

class _CoarseLinear(nn.Linear):
    """Stands in for a quantized Linear: its stored weight lives on a grid of 1/4."""


class _CoarseBackend(PlainLinearBackend):
    name = "coarse"

    def __init__(self, supports_merge: bool) -> None:
        self.supports_merge = supports_merge

    def matches(self, module):
        return isinstance(module, _CoarseLinear)

    def set_base_weight(self, module, weight):
        with torch.no_grad():
            module.weight.copy_(torch.round(weight * 4) / 4)


@pytest.fixture
def coarse(monkeypatch):
    def install(supports_merge: bool):
        backend = _CoarseBackend(supports_merge)
        original = validate.backend_for

        def pick(module):
            return backend if backend.matches(module) else original(module)

        monkeypatch.setattr(validate, "backend_for", pick)
        monkeypatch.setattr(transaction, "backend_for", pick)
        model = nn.Sequential(_CoarseLinear(16, 16), nn.Tanh(), _CoarseLinear(16, 16))
        with torch.no_grad():
            for m in model:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.round(torch.randn(16, 16)) / 4)
        return model

    return install


def test_requantization_loss_is_reported_and_warned(coarse):
    model = coarse(True)
    pristine = Pristine(model)
    adapter = _lora(["0", "2"], _dims(model), rank=2)
    with pytest.warns(UserWarning, match="mode='dynamic'"):
        report = apply_adapter(model, adapter, mode="merged")
    assert set(report.requant_loss) == {"0", "2"}
    assert all(0.1 < loss < 2 for loss in report.requant_loss.values())
    remove_adapter(model)
    pristine.assert_same(model)


def test_backend_without_merge_refuses_merged_and_runs_dynamic(coarse):
    model = coarse(False)
    pristine = Pristine(model)
    adapter = _lora(["0", "2"], _dims(model), rank=2)
    with pytest.raises(UnsupportedError, match="mode='dynamic'"):
        apply_adapter(model, adapter, mode="merged")
    pristine.assert_same(model)
    x = torch.randn(3, 16)
    apply_adapter(model, adapter, scale=1.5)
    torch.testing.assert_close(model(x), _manual(model, adapter, 1.5, x), rtol=1e-5, atol=1e-6)
    remove_adapter(model)
    pristine.assert_same(model)


# --- torch.compile ----------------------------------------------------------------------------------

def test_compiled_model_does_not_recompile_on_scale_change_or_hotswap():
    torch.compiler.reset()
    model = _stack()
    dims = _dims(model)
    first, second = _lora(["0", "4"], dims, seed=1), _lora(["0", "4"], dims, seed=2)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = torch.randn(4, 16)
    apply_adapter(model, first, scale=1.0, name="x")
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _manual(model, first, 1.0, x))
        n = len(graphs)
        set_adapter_scale(model, "x", -0.5)
        torch.testing.assert_close(compiled(x), _manual(model, first, -0.5, x))
        report = apply_adapter(model, second, scale=2.0, name="x")
        assert report.hotswapped
        torch.testing.assert_close(compiled(x), _manual(model, second, 2.0, x))
    assert len(graphs) == n, "a scale change or a same-shape swap recompiled the model"
    remove_adapter(model)
    torch.compiler.reset()


# --- threads ----------------------------------------------------------------------------------------

def test_concurrent_forwards_see_whole_sets_only():
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(24)])
    adapter = _lora([str(i) for i in range(24)], _dims(model), rank=4, seed=5)
    x = torch.randn(8, 32)
    with torch.no_grad():
        expected = [model(x)]
        for s in (1.0, 0.5):
            apply_adapter(model, adapter, scale=s, name="x")
            expected.append(model(x))
            remove_adapter(model)
    seen: list[torch.Tensor] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def forwards():
        try:
            with torch.no_grad():
                while not stop.is_set():
                    seen.append(model(x))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=forwards)
    thread.start()
    try:
        for _ in range(15):
            apply_adapter(model, adapter, scale=1.0, name="x")
            set_adapter_scale(model, "x", 0.5)
            set_active_adapters(model, [])
            set_active_adapters(model, ["x"])
            remove_adapter(model)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert seen
    for out in seen:
        assert any(torch.allclose(out, e, rtol=0, atol=1e-5) for e in expected), "a forward saw a mixed set"
