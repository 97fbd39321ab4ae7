"""Interrupts and races: every way out of a forward releases the model's read lock, and every public
function looks its state up under the write lock (a change racing a remove gets a LoRAError).

Every thread here is bounded: it is joined with a timeout, and a thread still alive after it is the
failure being tested for (a deadlock), reported instead of hanging the suite.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from _hostile import assert_untouched, state_bits
from _threads import JOIN_S, Worker

from zimage_lora import (
    Adapters,
    LoRAError,
    apply_adapter,
    examples,
    list_adapters,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)
from zimage_lora.apply.state import get_state


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("adapters")
    model = examples.tiny_model(seed=0)
    return {
        "a": examples.make_adapter("kohya", tmp / "a.safetensors", model, seed=1),
        "b": examples.make_adapter("lycoris-lokr", tmp / "b.safetensors", model, seed=2),
    }


def _wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the other thread never got there"
        time.sleep(0.005)


def _raising_hook(exc: type[BaseException]):
    def hook(module, args, output):
        raise exc()

    return hook


# --- item 1: every way out of a forward releases the read lock ---------------------------------------
@pytest.mark.parametrize("mode", ["dynamic", "merged"])
def test_keyboard_interrupt_inside_a_forward_does_not_lock_the_model(mode, files):
    model = examples.tiny_model(seed=0)
    pristine = state_bits(model)
    inputs = examples.tiny_inputs(seed=3)
    apply_adapter(model, files["a"], name="a", mode=mode)
    handle = model.layers[0].register_forward_hook(_raising_hook(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        examples.run_model(model, inputs)  # Ctrl-C in the middle of a forward
    handle.remove()

    def then() -> torch.Tensor:
        remove_adapter(model, "a")
        return examples.run_model(model, inputs)

    worker = Worker(then)
    assert worker.finished(), "remove_adapter / forward blocked after an interrupted forward"
    assert worker.error is None
    assert_untouched(model, pristine)
    assert torch.equal(worker.result, examples.run_model(model, inputs))


def test_a_thread_that_dies_inside_a_forward_does_not_lock_the_model(files):
    model = examples.tiny_model(seed=0)
    inputs = examples.tiny_inputs(seed=3)
    apply_adapter(model, files["a"], name="a")
    handle = model.layers[1].register_forward_hook(_raising_hook(SystemExit))
    dying = Worker(lambda: examples.run_model(model, inputs))
    assert dying.finished()
    assert isinstance(dying.error, SystemExit)
    handle.remove()
    remover = Worker(lambda: remove_adapter(model, "a"))
    assert remover.finished(), "remove_adapter blocked behind a forward whose thread is gone"
    assert remover.result == ["a"]
    # The same thread running again after its interrupt is not taken for a nested forward.
    apply_adapter(model, files["a"], name="a")
    handle = model.layers[1].register_forward_hook(_raising_hook(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        examples.run_model(model, inputs)
    handle.remove()
    examples.run_model(model, inputs)
    assert get_state(model).lock.readers == 0


def test_a_forward_refused_before_the_gate_releases_no_other_forwards_read(files):
    """A hook that runs before the gate raises. It must not release the count of another thread's
    forward, or a merged re-weight (which writes weights in place and so waits for running forwards)
    would run in the middle of that one."""
    model = examples.tiny_model(seed=0)
    inputs = examples.tiny_inputs(seed=3)
    apply_adapter(model, files["a"], name="a", mode="merged")
    inside, release = threading.Event(), threading.Event()

    def hold(module, args, output):
        if threading.current_thread() is not threading.main_thread():
            inside.set()
            release.wait(JOIN_S)

    handle = model.layers[0].register_forward_hook(hold)
    holder = Worker(lambda: examples.run_model(model, inputs))
    assert inside.wait(JOIN_S)

    def refuse(module, args):
        if module is model and threading.current_thread() is threading.main_thread():
            raise RuntimeError("refused before the gate")

    global_handle = torch.nn.modules.module.register_module_forward_pre_hook(refuse)
    try:
        with pytest.raises(RuntimeError, match="before the gate"):
            examples.run_model(model, inputs)
    finally:
        global_handle.remove()
    changer = Worker(lambda: set_adapter_scale(model, "a", 0.5))
    try:
        assert not changer.finished(0.5), "a change ran while another thread was inside a forward"
    finally:
        release.set()
        handle.remove()
    assert holder.finished() and holder.error is None
    assert changer.finished() and changer.error is None
    assert list_adapters(model)[0].scale == 0.5


def test_a_forward_is_counted_exactly_while_it_runs(files):
    """A forward is counted (so that a change writing in place waits for it) from its start to its end,
    once, whichever layer looks; the count is back to zero after it (no stack frames are kept)."""
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["a"], name="a")
    lock = get_state(model).lock
    seen = []

    def look(module, args, output):
        seen.append(lock.readers)

    handles = [model.layers[0].register_forward_hook(look), model.layers[1].register_forward_hook(look)]
    examples.run_model(model, examples.tiny_inputs(seed=3))
    for handle in handles:
        handle.remove()
    assert seen == [1, 1]
    assert lock.readers == 0


def test_keyboard_interrupt_inside_a_change_leaves_the_model_as_it_was(files, monkeypatch):
    from zimage_lora.apply import merge

    model = examples.tiny_model(seed=0)
    pristine = state_bits(model)
    real = merge.rebuild
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(merge, "rebuild", interrupted)
    with pytest.raises(KeyboardInterrupt):
        apply_adapter(model, files["a"], name="a", mode="merged")
    monkeypatch.setattr(merge, "rebuild", real)
    assert_untouched(model, pristine)
    worker = Worker(lambda: apply_adapter(model, files["a"], name="a", mode="merged"))
    assert worker.finished() and worker.error is None
    assert [a.name for a in list_adapters(model)] == ["a"]


# --- item 2: a change racing a remove ----------------------------------------------------------------
def _race_with_remove(model: torch.nn.Module, change: Callable[[], object], remove: list[str]) -> BaseException | None:
    """Start `change` while this thread holds the model's write lock, let it wait for the lock, remove
    `remove` (re-entering the lock), release: `change` then finds its adapters gone."""
    state = get_state(model)
    with state.lock:
        worker = Worker(change)
        _wait_for(lambda: state.lock._writers_waiting == 1 or not worker.thread.is_alive())
        for name in remove:
            remove_adapter(model, name)
    assert worker.finished()
    return worker.error


@pytest.mark.parametrize("left", [[], ["b"]], ids=["last-adapter", "one-of-two"])
def test_set_adapter_scale_racing_a_remove_gives_a_lora_error(files, left):
    model = examples.tiny_model(seed=0)
    for name in ["a", *left]:
        apply_adapter(model, files[name], name=name)
    error = _race_with_remove(model, lambda: set_adapter_scale(model, "a", 2.0), ["a"])
    assert isinstance(error, LoRAError) and not isinstance(error, KeyError), repr(error)
    assert "no adapter named 'a'" in str(error)
    assert [a.name for a in list_adapters(model)] == left


def test_set_active_adapters_racing_a_remove_gives_a_lora_error(files):
    model = examples.tiny_model(seed=0)
    apply_adapter(model, files["a"], name="a")
    apply_adapter(model, files["b"], name="b")
    error = _race_with_remove(model, lambda: set_active_adapters(model, ["a", "b"], [0.5, 0.5]), ["b"])
    assert isinstance(error, LoRAError), repr(error)
    assert "'b'" in str(error)
    assert [(a.name, a.scale, a.active) for a in list_adapters(model)] == [("a", 1.0, True)]
    # The last one gone: the change must not act on the dropped state and report success.
    error = _race_with_remove(model, lambda: set_active_adapters(model, ["a"]), ["a"])
    assert isinstance(error, LoRAError), repr(error)


@pytest.mark.parametrize("method", ["fuse", "unfuse"])
def test_fuse_racing_a_remove_does_not_bring_the_adapter_back(files, method):
    model = examples.tiny_model(seed=0)
    pristine = state_bits(model)
    apply_adapter(model, files["a"], name="a", mode="dynamic" if method == "fuse" else "merged")
    error = _race_with_remove(model, lambda: getattr(Adapters(model), method)("a"), ["a"])
    assert isinstance(error, LoRAError), repr(error)
    assert list_adapters(model) == []
    assert_untouched(model, pristine)


def test_changes_racing_removes_raise_only_lora_errors(files):
    """Bounded churn (1.5 s, 300 steps a thread): one thread attaches and removes, two re-weight,
    switch and fuse the same name. Every failure is a LoRAError and the model ends pristine."""
    model = examples.tiny_model(seed=0)
    pristine = state_bits(model)
    stop = time.monotonic() + 1.5
    unexpected: list[BaseException] = []
    handle = Adapters(model)

    def churn() -> None:
        for _ in range(300):
            if time.monotonic() > stop:
                return
            apply_adapter(model, files["a"], name="a")
            remove_adapter(model, "a")

    def changes(step: int) -> Callable[[], None]:
        actions = [
            lambda: set_adapter_scale(model, "a", 0.5),
            lambda: set_active_adapters(model, ["a"], [0.7]),
            lambda: handle.fuse("a"),
            lambda: handle.unfuse("a"),
            lambda: handle.disable("a"),
        ]

        def run() -> None:
            for i in range(300):
                if time.monotonic() > stop:
                    return
                try:
                    actions[(i + step) % len(actions)]()
                except LoRAError:
                    pass
                except BaseException as exc:  # noqa: BLE001 - the failure under test
                    unexpected.append(exc)
                    return

        return run

    workers = [Worker(churn), Worker(changes(0)), Worker(changes(2))]
    assert all(w.finished() for w in workers), "a thread deadlocked"
    assert [w.error for w in workers] == [None, None, None]
    assert not unexpected, repr(unexpected[0])
    remove_adapter(model)
    assert_untouched(model, pristine)
