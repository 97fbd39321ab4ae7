"""A forward takes one view of the model at its start; per-sample blocks and store activations belong to
the context that made them; the change lock survives an interrupt anywhere in its own code.

Each test here is a race or an interrupt made deterministic (a hook holds one thread at a chosen
point, or a tracer raises at a chosen function entry or line). Every thread is joined with a
timeout; one still alive after it is the failure under test (a deadlock), reported, not hung.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _threads import JOIN_S, Worker

import zimage_lora as zl
from zimage_lora import examples
from zimage_lora.apply.state import get_state


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    clean = examples.tiny_model(seed=0)
    return {
        "a": examples.make_adapter("kohya", tmp / "a.safetensors", clean, seed=1,
                                   targets=["layers.0.attention.to_q", "layers.1.feed_forward.w2"]),
        "z": examples.make_adapter("kohya", tmp / "z.safetensors", clean, seed=7, targets=["layers.1.attention.to_k"]),
    }


INPUTS = examples.tiny_inputs(seed=3)


def forward(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return examples.run_model(model, INPUTS)


def _pause_in(layer: torch.nn.Module, thread_name: str) -> tuple[threading.Event, threading.Event, object]:
    """A hook that holds the forward of the thread named `thread_name` after `layer`: (inside, go, handle)."""
    inside, go = threading.Event(), threading.Event()

    def hook(module, args, output):
        if threading.current_thread().name == thread_name:
            inside.set()
            go.wait(JOIN_S)

    return inside, go, layer.register_forward_hook(hook)


# --- one view per forward -----------------------------------------------------------------------------
def test_a_dynamic_change_does_not_wait_for_a_running_forward_and_is_not_seen_by_it(files):
    model = examples.tiny_model(seed=0)
    zl.apply_adapter(model, files["a"], name="a")
    before = forward(model)
    zl.set_adapter_scale(model, "a", -2.0)
    after = forward(model)
    zl.set_adapter_scale(model, "a", 1.0)
    inside, go, handle = _pause_in(model.layers[0], "held")
    holder = Worker(lambda: forward(model), name="held")
    try:
        assert inside.wait(JOIN_S)
        changer = Worker(lambda: zl.set_adapter_scale(model, "a", -2.0))
        assert changer.finished(5.0), "a re-weight waited for a forward on another thread"
        assert changer.error is None
    finally:
        go.set()
        handle.remove()
    assert holder.finished() and holder.error is None
    # layers.1 ran after the re-weight, in the view taken before it: the whole forward is the old state.
    assert torch.equal(holder.result, before)
    assert torch.equal(forward(model), after)


def test_a_slot_recast_by_another_forward_leaves_this_ones_tensors_alone(files, monkeypatch):
    """A forward in another dtype recasts a slot's buffers; a forward already using them keeps its own."""
    from zimage_lora.apply import kernels

    model = examples.tiny_model(seed=0)
    zl.apply_adapter(model, files["a"], name="a")
    wrapper = model.layers[0].attention.to_q
    slot = next(iter(wrapper.slots.values()))
    real = kernels.add_fn
    fired = []

    def add_fn(kind):
        fn = real(kind)

        def add(rows, x, part, t, alpha):
            if not fired:
                fired.append(1)
                slot._ready(torch.zeros(1, x.shape[-1], dtype=torch.float64))  # "another thread", fp64
            return fn(rows, x, part, t, alpha)

        return add

    monkeypatch.setattr(kernels, "add_fn", add_fn)
    x = torch.randn(3, wrapper.in_features)
    out = torch.zeros(3, wrapper.out_features)
    slot.add_(out, x, None, 1.0)
    assert fired and torch.isfinite(out).all()


# --- per-sample blocks belong to their context --------------------------------------------------------
def test_a_forward_on_another_thread_during_a_block_runs_the_shared_set(files):
    model = examples.tiny_model(seed=0)
    zl.apply_adapter(model, files["a"], name="a")
    shared = forward(model)
    with zl.per_sample_adapters(model, [{"a": 2.5}]):
        inside = forward(model)
        other = Worker(lambda: forward(model))
        assert other.finished() and other.error is None
    assert not torch.allclose(inside, shared)
    assert torch.equal(other.result, shared)


def test_a_forward_racing_the_end_of_a_block_runs_whole(files):
    """A forward on another thread starts while the block is open and runs on after it closed."""
    model = examples.tiny_model(seed=0)
    zl.apply_adapter(model, files["a"], name="a")
    shared = forward(model)
    started, closed = threading.Event(), threading.Event()

    def pause(module, args):
        if module is model and threading.current_thread().name == "racer":
            started.set()
            closed.wait(JOIN_S)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pause)
    try:
        with zl.per_sample_adapters(model, [{"a": 2.5}]):
            racer = Worker(lambda: forward(model), name="racer")
            started.wait(JOIN_S)
        closed.set()
        assert racer.finished()
    finally:
        closed.set()
        handle.remove()
    assert racer.error is None, repr(racer.error)
    assert torch.equal(racer.result, shared)


def test_an_adapter_attached_during_a_block_adds_nothing_inside_it(files):
    model = examples.tiny_model(seed=0)
    zl.apply_adapter(model, files["a"], name="a")
    with zl.per_sample_adapters(model, [{"a": 0.5}]):
        first = forward(model)
        zl.apply_adapter(model, files["z"], name="z")  # wraps a layer the block has no routing for
        assert torch.equal(forward(model), first)
    assert not torch.equal(forward(model), examples.run_model(examples.tiny_model(seed=0), INPUTS))


def test_a_per_sample_strength_that_overflows_is_refused_before_the_forward(files):
    """fp16 compute: a strength of 1e37 makes every delta overflow. The shared path refuses it; a
    per-sample spec is refused by the same rule, on entering the block (before, a NaN sample)."""
    model = examples.tiny_model(seed=0, dtype=torch.float16)
    zl.apply_adapter(model, files["a"], name="a")
    inputs = examples.tiny_inputs(seed=3, dtype=torch.float16)
    with torch.no_grad():
        before = examples.run_model(model, inputs)
    with pytest.raises(zl.LoRAError, match="overflows") as shared:
        zl.set_adapter_scale(model, "a", 1e37)
    with pytest.raises(zl.LoRAError, match="overflows") as per_sample, torch.no_grad():
        with zl.per_sample_adapters(model, [{"a": 1e37}]):
            examples.run_model(model, inputs)
    assert type(per_sample.value) is type(shared.value)
    with zl.per_sample_adapters(model, [{"a": 1.0}]), torch.no_grad():
        assert torch.equal(examples.run_model(model, inputs), before)


# --- the store attaches inactive, in one change -------------------------------------------------------
def test_the_store_never_publishes_a_leased_adapter_active(files, monkeypatch):
    """Between the changes the store makes (the moments a forward on another thread could start), no
    store adapter is active: they act only through per-sample blocks. Seen at the start of each change,
    which finds the previous one's result (before: attached active, then deactivated by a second change)."""
    from zimage_lora.apply.gate import ForwardGate

    model = examples.tiny_model(seed=0)
    zl.apply_adapter(model, files["z"], name="mine")
    seen: list[list[str]] = []
    real = ForwardGate.begin

    def begin(gate):
        state = get_state(gate.model)
        seen.append([r.name for r in state.records.values() if r.active] if state is not None else [])
        real(gate)

    monkeypatch.setattr(ForwardGate, "begin", begin)
    store = zl.AdapterStore(model, roots=[files["a"].parent])
    with store.lease([files["a"]]) as lease:
        spec = lease.spec([(files["a"], 1.0)])
        assert list(spec) and all(n.startswith("store") for n in spec)
    zl.set_adapter_scale(model, "mine", 1.0)  # one more change: it sees what the lease left
    assert len(seen) >= 2
    assert all(active == ["mine"] for active in seen), seen


# --- interrupts in the lock's own code ----------------------------------------------------------------
_LOCK_CODE = ("gate.py", "state.py")
_LOCK_CLASSES = ("ChangeLock", "ForwardGate", "ReadWriteLock", "end_change", "exclude_changing", "build_view")


def _ours(code) -> bool:
    return code.co_filename.endswith(_LOCK_CODE) and code.co_qualname.startswith(_LOCK_CLASSES)


def _interrupt_at(k: int, lines: bool) -> Callable:
    """A tracer raising KeyboardInterrupt at the k-th function entry (or line) of the lock's code."""
    count = [0]

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == k:
                raise KeyboardInterrupt
        return local

    def tracer(frame, event, arg):
        if event != "call" or not _ours(frame.f_code):
            return None
        if lines:
            # Lines of the lock's entry only (where a count once went up outside its `try`): a tracer
            # raising on a `with` line's exit would skip a C `__exit__` no real interrupt can skip.
            return local if frame.f_code.co_qualname.endswith("Lock.__enter__") else None
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt
        return None

    return tracer


@pytest.mark.parametrize("mode", ["dynamic", "merged"])
@pytest.mark.parametrize("where", ["entries", "lines"])
def test_an_interrupt_anywhere_in_the_lock_code_of_a_change_locks_nothing(files, mode, where):
    model = examples.tiny_model(seed=0)
    zl.apply_adapter(model, files["a"], name="a", mode=mode)
    states = {1.0: forward(model)}
    zl.set_adapter_scale(model, "a", 0.5)
    states[0.5] = forward(model)
    hit = 0
    for k in range(1, 200):
        zl.set_adapter_scale(model, "a", 1.0)
        sys.settrace(_interrupt_at(k, lines=where == "lines"))
        try:
            zl.set_adapter_scale(model, "a", 0.5)
        except KeyboardInterrupt:
            hit += 1
        else:
            break
        finally:
            sys.settrace(None)
        other = Worker(lambda: (forward(model), zl.set_adapter_scale(model, "a", 1.0), forward(model)))
        assert other.finished(), f"interrupt {k}: the model stayed locked for other threads"
        assert other.error is None, repr(other.error)
        first, _, last = other.result
        assert any(torch.equal(first, ref) for ref in states.values()), f"interrupt {k}: a mixed state"
        assert torch.equal(last, states[1.0])
        assert get_state(model).lock.readers == 0
    assert hit > 0  # the sweep reached the lock's code


def test_key_index_survives_a_module_tree_changing_during_its_walk():
    """Resolving a file runs outside the change lock: another thread's change can wrap a layer while the
    index walks `named_modules()` (it raised 'dictionary changed size during iteration')."""
    from zimage_lora.keys.index import ModuleIndex

    class Growing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.walks = 0

        def named_modules(self, *args: object, **kwargs: object):  # type: ignore[override]
            self.walks += 1
            for i, item in enumerate(super().named_modules(*args, **kwargs)):
                if self.walks == 1 and i == 1:
                    self.b = torch.nn.Linear(4, 4)  # as another thread's wrap would, mid-walk
                yield item

    model = Growing()
    index = ModuleIndex(model)
    assert set(index.shapes) == {"a", "b"}
    assert model.walks == 2
