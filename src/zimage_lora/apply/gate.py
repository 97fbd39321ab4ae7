"""What a forward pass sees while adapters change: a published view, and exclusion only for in-place work.

The story in prose is docs/threading.md; this module is its mechanism.

- `ForwardGate` replaces the root model's `forward` (an instance attribute, so `model(...)` runs it)
  and wraps the model's own forward in `try/finally`. At its start a forward reads the model's
  published `View` once: every wrapped layer's active slots with their strengths, immutable. Each
  `AdapterLinear` of the model looks itself up in the view of the forward running in its context
  (`current()`, a context variable), so a forward sees one state of the whole model, whatever
  changes are published while it runs.
- `ChangeLock`: every change holds it, so changes run one at a time. A change publishes a new view
  at its end (`end_change`); until then forwards keep taking the old one and never wait.
- Work that writes in place (merged weights, hot-swapped or re-prepared slot buffers, unwrapping a
  layer) calls `exclude()` first: from then until the change ends new forwards wait and the change
  waits for the forwards already running. Forwards are counted for that, not locked.

Robust to interrupts without looking at stack frames: the forward's count is released in a
`finally`; the change lock is a C `RLock` whose `__exit__` cannot be interrupted on entry; what a
change leaves behind when interrupted before its end (a view not yet published, the exclusion flag)
is repaired by the next forward or change, which can tell by taking the change lock.
"""

from __future__ import annotations

import _thread
import copy
import functools
import itertools
import threading
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import LoRAError

if TYPE_CHECKING:
    from .layer import AdapterLinear

ATTR = "_zimage_lora_state"  # the EngineState on the model (see apply.state)

# Wrappers and views are numbered in creation order: a wrapper newer than a forward's view was made
# by a change that forward does not see, so it adds nothing to that forward.
SERIAL = itertools.count(1)


class View:
    """One published state of a model: each wrapper's active state (slots, needs wx, transforms input),
    as `AdapterLinear.active_state` makes it, and each adapter's strength by its `Strength` object."""

    __slots__ = ("layers", "values", "serial")

    def __init__(self, layers: dict[Any, tuple[Any, ...]], values: dict[Any, float]) -> None:
        self.layers = layers
        self.values = values
        self.serial = next(SERIAL)


class LayerRoute(Protocol):
    """What a per-sample or regional block routes one wrapped layer through, for the forwards it owns."""

    def add_(self, layer: AdapterLinear, out: torch.Tensor, x: torch.Tensor, fwd: Forward) -> torch.Tensor: ...


class Forward:
    """One running root forward: its gate and view, and inside a per-sample block that block's routing
    and this call's batch (`total`) and per-sample row offsets (`bounds`)."""

    __slots__ = ("gate", "view", "routes", "total", "bounds")

    def __init__(self, gate: ForwardGate, view: View) -> None:
        self.gate, self.view = gate, view
        self.routes: Mapping[AdapterLinear, LayerRoute] | None = None
        self.total: int | None = None
        self.bounds: dict[str, list[int]] = {}


_FORWARD: ContextVar[Forward | None] = ContextVar("zimage_lora_forward", default=None)
# Per-sample blocks open in this context: gate -> block (apply.per_sample_block). Replaced, never mutated.
BLOCKS: ContextVar[dict[Any, Any]] = ContextVar("zimage_lora_blocks", default={})  # noqa: B039 - never mutated
_changing = threading.local()  # .gates: the gates whose change lock this thread took; .last: see `touched`


def touched() -> int:
    """A wrapper's active set, or the set of wrappers, changed in this thread: the next view this thread
    publishes rebuilds the layer table (otherwise only the strengths are read again). Returns the
    touch's number (unique over all threads), also kept as this thread's last."""
    n = _changing.last = next(SERIAL)
    return n


def current() -> Forward | None:
    """The root forward running in this context, if any."""
    return _FORWARD.get()


class ChangeLock(_thread.RLock):  # type: ignore[misc]  # final in typeshed; CPython allows it
    """Held by a change (`with state.lock:`): changes run one at a time. Entered in Python, left by the
    C `RLock.__exit__`, so an interrupt can stop a change anywhere and the lock is still given back."""

    gate: ForwardGate
    _writers_waiting = 0  # diagnostics (tests): changes waiting for the lock; nothing depends on it

    if TYPE_CHECKING:  # C methods of `_thread.RLock` that typeshed leaves out
        def _is_owned(self) -> bool: ...
        def _recursion_count(self) -> int: ...

    def __enter__(self) -> ChangeLock:  # type: ignore[override]  # takes no blocking/timeout
        gate = self.gate
        fwd = _FORWARD.get()
        if fwd is not None and fwd.gate is gate and not self._is_owned():
            raise LoRAError("a change to a model's adapters was made from inside a forward of that model (a hook?); "
                            "it would wait for that forward for ever. Make it before or after the forward.")
        depth = self._recursion_count()
        # Whatever interrupts this (even between two lines), the lock is held at `depth` again after it.
        try:
            self._writers_waiting += 1
            try:
                self.acquire()
            finally:
                self._writers_waiting -= 1
            if depth == 0:
                gate.begin()
            return self
        except BaseException:
            if self._recursion_count() > depth:
                self.release()
            raise

    @property
    def readers(self) -> int:
        return self.gate.readers


def _new_lock(gate: ForwardGate) -> ChangeLock:
    lock = ChangeLock()
    lock.gate = gate
    return lock


class ForwardGate:
    """The model's `forward`, gated: see the module doc. Stays on the model once installed (it holds no
    tensors and changes no output); a copy or an unpickled model gets a fresh one."""

    def __init__(self, model: torch.nn.Module, inner: Any = None) -> None:
        self.model = model
        self.inner = inner  # a forward that was already an instance attribute (e.g. accelerate's), else None
        self.mutex = _thread.allocate_lock()  # guards the counters below, held for a few operations
        self.lock = _new_lock(self)
        self.view = View({}, {})
        self.dirty = True  # the published view may be out of date: rebuilt under the lock
        self.exclusive = False  # a change writes in place: new forwards wait (stale after an interrupt)
        self.readers = 0  # counted forwards running
        self._drain: Any = None  # released by the last counted forward while a change waits
        self._mark = -1  # `touched` count when the running change began

    # -- the forward ------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The class's forward called with the model, not `forward.__get__(model)`: torch.compile models
        # that bound method as `model.forward`, which is this gate again (an endless inlining).
        if self.inner is not None:
            inner = self.inner
        else:
            inner = functools.partial(type(self.model).forward, self.model)
        if torch.compiler.is_compiling():
            return inner(*args, **kwargs)  # a compiled graph takes no view (docs/threading.md)
        outer = _FORWARD.get()
        if outer is not None and outer.gate is self:
            return inner(*args, **kwargs)  # a nested call runs in the outer forward's view
        counted = 0
        token = None
        try:
            while True:  # count this forward in, unless a change writes in place (see `exclude`)
                with self.mutex:
                    if not self.exclusive:
                        self.readers = counted = self.readers + 1  # one statement: counted iff incremented
                        break
                if self.lock._is_owned():
                    break  # the change holding the lock runs this forward itself
                self._await_change()
            fwd = Forward(self, self._fresh_view())
            block = BLOCKS.get().get(self)
            if block is not None:
                block.begin(fwd, args, kwargs)
            token = _FORWARD.set(fwd)
            return inner(*args, **kwargs)
        finally:
            if token is not None:
                _FORWARD.reset(token)
            if counted:
                with self.mutex:
                    self.readers -= 1
                    if not self.readers and self._drain is not None:
                        self._drain.release()
                        self._drain = None

    def _await_change(self) -> None:
        """Wait for the change that writes in place; once we hold its lock it has ended (a flag still
        set was left by an interrupt)."""
        self.lock.acquire()
        try:
            self._settle()
        finally:
            self.lock.release()

    def _fresh_view(self) -> View:
        """The published view, brought up to date first if a change ended without publishing."""
        if self.dirty and not self.lock._is_owned() and self.lock.acquire(False):
            try:
                self._settle()
            finally:
                self.lock.release()
        return self.view

    def _settle(self, layers: bool = True) -> None:
        """No change is running (the lock is ours, once): publish what the last one left."""
        if self.dirty:
            self.publish(layers)
        self.exclusive = False

    # -- changes ----------------------------------------------------------------------------------
    def begin(self) -> None:
        """A change starts (outermost, lock held): the view is made current, then marked out of date."""
        self._settle()
        gates = getattr(_changing, "gates", None)
        if gates is None:
            gates = _changing.gates = weakref.WeakSet()
        gates.add(self)
        self._mark = getattr(_changing, "last", 0)
        self.dirty = True

    def publish(self, layers: bool = True) -> None:
        """Publish the model's current state as the view new forwards take (lock held). `layers=False`:
        no wrapper's active set changed since the last view, only strengths may have."""
        self.view = build_view(self.model, None if layers else self.view.layers)
        self.dirty = False

    def exclude(self) -> None:
        """From now to the end of this change, no forward runs: wait for those running, hold back new ones."""
        if self.exclusive:
            return
        with self.mutex:
            self.exclusive = True
            drain = None
            if self.readers:
                drain = self._drain = _thread.allocate_lock()
                drain.acquire()
        if drain is not None:
            drain.acquire()  # released by the last counted forward

    # -- what other tools see -------------------------------------------------------------------------
    @property
    def __wrapped__(self) -> Any:  # inspect.signature(model.forward) shows the model's own
        return self.inner if self.inner is not None else type(self.model).forward.__get__(self.model)

    def __deepcopy__(self, memo: dict[int, Any]) -> ForwardGate:
        return ForwardGate(copy.deepcopy(self.model, memo), copy.deepcopy(self.inner, memo))

    def __reduce__(self) -> tuple[Any, ...]:
        return ForwardGate, (self.model, self.inner)


def end_change(lock: ChangeLock) -> None:
    """The outermost change on this lock ends (still held): publish its result and end any exclusion."""
    if lock._recursion_count() == 1:
        gate = lock.gate
        gate._settle(layers=getattr(_changing, "last", 0) != gate._mark)


def exclude_changing() -> None:
    """Called before writing in place (weights, slot buffers, unwrapping): exclusion on every model this
    thread is changing. Outside a change (e.g. `load_state_dict`) there is none (docs/threading.md)."""
    for gate in list(getattr(_changing, "gates", ())):
        if gate.lock._is_owned():
            gate.exclude()


def gate_of(model: torch.nn.Module) -> ForwardGate:
    """The model's gate, installed on first use."""
    gate = model.__dict__.get("forward")
    if isinstance(gate, ForwardGate) and gate.model is model:
        return gate
    gate = ForwardGate(model, gate)
    model.__dict__["forward"] = gate
    return gate


def build_view(model: torch.nn.Module, layers: dict[Any, tuple[Any, ...]] | None = None) -> View:
    """Every wrapped layer's active slots (or `layers`, still current) and the strengths now (the caller
    holds the change lock)."""
    state = model.__dict__.get(ATTR)
    if state is None:
        return View({}, {})
    if layers is None:
        ready = state.view_layers  # the switching tables' (apply.switching), if no other touch since
        if ready is not None and ready[0] == getattr(_changing, "last", 0):
            layers = ready[1]
        else:
            layers = {w: w._active for w in state.wrappers(model)}
    # Per-block strengths (apply.blockwise): each module with its own number is in the view as well.
    strengths = [s for r in state.records.values() for s in (r.strength, *r.strength.children.values())]
    return View(layers, {s: s.value for s in strengths})
