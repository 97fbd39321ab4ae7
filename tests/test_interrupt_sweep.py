"""A KeyboardInterrupt at any function entry during a change breaks no promise.

Each change below runs once under a counting tracer (`sys.settrace`), then again once per injection
point with a KeyboardInterrupt raised on entry to that call: every call made by the package's own
code, except inside the forward lock (its own interrupt safety is tested with the lock). After each
interrupted change the model lists the adapters as before or as after the change, and a
`remove_adapter()` leaves no wrapper and every tensor bit-identical to the untouched model.

Bounded: every injection point inside the transaction and its scope, and an even sample of the
others (`ZIMAGE_SWEEP=all` injects at every one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from _apply_util import Pristine

from zimage_lora import (
    Adapters,
    apply_adapter,
    examples,
    list_adapters,
    load_adapter,
    remove_adapter,
    set_active_adapters,
    set_adapter_scale,
)
from zimage_lora.apply.layer import AdapterLinear
from zimage_lora.apply.state import get_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PACKAGE = str(Path(examples.__file__).parent)
CORE = tuple(str(Path(PACKAGE) / "apply" / f) for f in ("transaction.py", "access.py"))
SAMPLE = None if os.environ.get("ZIMAGE_SWEEP") == "all" else 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    model = examples.tiny_model(seed=0)
    names = examples.linear_names(model)
    groups = {"a": names[3:5], "m": names[4:6], "n": names[6:8], "a2": names[3:5]}
    return {
        key: load_adapter(examples.make_adapter("kohya", tmp / f"{key}.safetensors", model, seed=i, targets=t), model)
        for i, (key, t) in enumerate(groups.items())
    }


def _setup(adapters):
    model = examples.tiny_model(seed=0)
    pristine = Pristine(model)
    apply_adapter(model, adapters["a"], name="a")
    apply_adapter(model, adapters["m"], name="m", mode="merged", scale=0.5)
    return model, pristine


CHANGES = {
    "apply dynamic": lambda m, a: apply_adapter(m, a["n"], name="n"),
    "apply merged": lambda m, a: apply_adapter(m, a["n"], name="n", mode="merged"),
    "hot swap": lambda m, a: apply_adapter(m, a["a2"], name="a"),
    "remove dynamic": lambda m, a: remove_adapter(m, "a"),
    "remove all": lambda m, a: remove_adapter(m),
    "re-weight merged": lambda m, a: set_adapter_scale(m, "m", 2.0),
    "re-weight dynamic": lambda m, a: set_adapter_scale(m, "a", 2.0),
    "switch dynamic": lambda m, a: set_active_adapters(m, ["m"]),
    "switch dynamic, same merged strength": lambda m, a: set_active_adapters(m, ["a", "m"], [1.5, 0.5]),
    "set active": lambda m, a: set_active_adapters(m, ["m"], [1.5]),
    "fuse": lambda m, a: Adapters(m).fuse("a"),
    "unfuse": lambda m, a: Adapters(m).unfuse("m"),
}


class Tracer:
    """Counts the package's calls (and raises KeyboardInterrupt on entry to call number `at`)."""

    def __init__(self, model, at: int | None = None) -> None:
        lock = type(get_state(model).lock)
        self.lock_code = {getattr(v, "__code__", None) for v in vars(lock).values()} - {None}
        self.at, self.n, self.core = at, 0, []

    def __call__(self, frame, event, arg):
        if event != "call":
            return None
        caller = frame.f_back
        if caller is None or frame.f_code in self.lock_code or caller.f_code in self.lock_code:
            return None
        if not (frame.f_code.co_filename.startswith(PACKAGE) or caller.f_code.co_filename.startswith(PACKAGE)):
            return None
        self.n += 1
        if frame.f_code.co_filename in CORE or caller.f_code.co_filename in CORE:
            self.core.append(self.n)
        if self.n == self.at:
            raise KeyboardInterrupt(f"injected at call {self.n}: {frame.f_code.co_qualname}")
        return None


def _listing(model) -> list[tuple]:
    return [(i.name, i.mode, i.scale, i.active) for i in list_adapters(model)]


def _points(adapters, change) -> list[int]:
    model, _ = _setup(adapters)
    tracer = Tracer(model)
    sys.settrace(tracer)
    try:
        change(model, adapters)
    finally:
        sys.settrace(None)
    every = range(1, tracer.n + 1)
    if SAMPLE is None:
        return list(every)
    step = max(1, tracer.n // SAMPLE)
    return sorted(set(tracer.core) | set(every[::step]) | {tracer.n})


@pytest.mark.parametrize("name", list(CHANGES))
def test_an_interrupt_at_any_call_of_a_change_breaks_no_promise(adapters, name):
    change = CHANGES[name]
    model, _ = _setup(adapters)
    before = _listing(model)
    change(model, adapters)
    after = _listing(model)
    points = _points(adapters, change)
    assert len(points) > 10
    broken = []
    for at in points:
        model, pristine = _setup(adapters)
        tracer = Tracer(model, at)
        sys.settrace(tracer)
        try:
            change(model, adapters)
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        listed = _listing(model)
        remove_adapter(model)
        wrappers = [n for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
        try:
            pristine.assert_same(model)
            same = True
        except AssertionError:
            same = False
        if listed not in (before, after) or wrappers or not same:
            broken.append((at, listed, wrappers[:3], same))
    assert not broken, f"{len(broken)} of {len(points)} interrupts broke a promise: {broken[:5]}"
