"""Per-model bookkeeping: which adapters are attached, the kept originals, and the lock that keeps
forward passes from seeing half of a change.

The state lives on the model as one private attribute and is deleted when the last adapter goes:
with everything removed, the model's parameters, buffers and module tree are bit-identical to before
the first apply. The model is not quite the object it was: hooks that hold no tensors and change no
output stay on its root, the forward gate (see `ForwardGate`) and, once a dynamic adapter patched a
norm layer, the state_dict hooks of `apply.checkpoint`.
"""

from __future__ import annotations

import copy
import math
import sys
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import torch

from ..adapter import Adapter, Target
from ..blocks import Blocks

ATTR = "_zimage_lora_state"


class Strength:
    """One adapter's user scale, shared by every layer it touches: changing it is O(1) for the model.

    `value` is read by eager forwards; `tensor` (0-d fp32) by compiled ones, updated in place so a
    compiled graph sees the new value without recompiling. A per-block strength (`blocks.Blocks`)
    gives the modules whose number differs from the default a child `Strength` of their own (`at`),
    kept from then on so that later changes stay in-place fills (see `apply.blockwise`).
    """

    __slots__ = ("value", "tensor", "blocks", "children", "values")

    def __init__(self, value: float | Blocks) -> None:
        self.tensor = torch.tensor(0.0, dtype=torch.float32)
        self.children: dict[str, Strength] = {}
        self.values: torch.Tensor | None = None  # the children's numbers; each child's `tensor` is a view
        self.set(value)

    def set(self, value: float | Blocks) -> None:
        blocks = value if isinstance(value, Blocks) else None
        self.blocks = blocks
        self.value = blocks.default if blocks is not None else float(value)
        self.tensor.fill_(self.value)
        grown = False
        if blocks is not None:
            for module, v in blocks.values.items():
                if v != self.value and module not in self.children:
                    self.children[module] = Strength(v)
                    grown = True
        if not self.children:
            return
        get = blocks.values.get if blocks is not None else {}.get
        numbers = [get(m, self.value) for m in self.children]
        for child, v in zip(self.children.values(), numbers, strict=True):
            child.value = v
        if grown or self.values is None:
            self._views(torch.tensor(numbers, dtype=torch.float32))
        else:
            self.values.copy_(torch.tensor(numbers, dtype=torch.float32))  # one write for every module

    def _views(self, values: torch.Tensor) -> None:
        self.values = values
        for i, child in enumerate(self.children.values()):
            child.tensor = values[i]

    def get(self) -> float | Blocks:
        """What `set` was given last (a number or a per-block strength)."""
        return self.blocks if self.blocks is not None else self.value

    def at(self, module: str) -> Strength:
        """The Strength a slot on `module` reads."""
        return self.children.get(module, self)

    def __deepcopy__(self, memo: dict) -> Strength:
        new = Strength(self.value)
        memo[id(self)] = new
        new.blocks = self.blocks
        new.children = {m: copy.deepcopy(c, memo) for m, c in self.children.items()}
        if new.children:
            new._views(torch.tensor([c.value for c in new.children.values()], dtype=torch.float32))
        return new


@dataclass
class Record:
    """One attached adapter."""

    name: str
    mode: str  # "merged" | "dynamic"
    adapter: Adapter
    strength: Strength
    compute_dtype: torch.dtype | None = None
    # Targets written into weights (every target in merged mode; norm patches in dynamic mode).
    patches: list[Target] = field(default_factory=list)
    # Dynamic mode: module name -> slot keys inside that module's wrapper.
    wrapped: dict[str, list[str]] = field(default_factory=dict)
    # Inactive adapters stay attached (their slots and factors kept) but add nothing.
    active: bool = True
    # Dynamic mode: the largest |strength| its slots surely stay finite at (see validate.check_dynamic).
    headroom: float = math.inf

    @property
    def scale(self) -> float:
        return self.strength.value


@dataclass
class Snapshot:
    """The exact original of one patched module: backend state of the weight, and the bias if touched."""

    backend: Any
    weight: Any
    bias: torch.Tensor | None = None


# How often a change waiting on forward passes looks for ones that were left without releasing.
STALE_POLL_S = 0.05
_CALL_IMPL = torch.nn.Module._call_impl.__code__


def forward_frame(caller: FrameType | None) -> FrameType | None:
    """The `Module._call_impl` frame a forward hook was called from (looking a few frames up).

    That frame is on its thread's stack for exactly as long as the forward runs, however the forward
    is left, so it identifies one forward call: the pre-hook and the post-hook (called from a nested
    function, or from the exception path) find the same frame.
    """
    frame = caller
    for _ in range(4):
        if frame is None:
            break
        if frame.f_code is _CALL_IMPL:
            return frame
        frame = frame.f_back
    return caller


def _stack_ids(top: FrameType | None) -> set[int]:
    ids = set()
    while top is not None:
        ids.add(id(top))
        top = top.f_back
    return ids


class ReadWriteLock:
    """Many forward passes at once, or one change at a time.

    Readers (forwards) never wait for each other; a change waits until running forwards finish and
    holds new ones back until it is done, so every forward sees the adapters before or after it.
    A waiting change also holds back forwards that have not started yet: with two threads running
    forwards back to back the reader count would otherwise never reach zero and the change would
    wait for ever. A thread already inside a forward (a nested call) is let through, since making it
    wait for the change would deadlock.

    Each read is held for one forward call, identified by its frame. torch runs the releasing hook
    when a forward raises an `Exception`, but not for a `KeyboardInterrupt` or `SystemExit`, and not
    for a thread that dies; so a read whose frame is no longer on its thread's stack is forgotten (by
    a waiting change, and by that thread's next forward). A release that matches no held read (a
    hook before the gate raised, so the gate never took it) releases nothing.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        # thread id -> the forward frames it holds the read side for, innermost last
        self._held: dict[int, list[FrameType | None]] = {}
        self._writer: int | None = None
        self._depth = 0
        self._writers_waiting = 0

    @property
    def readers(self) -> int:
        return sum(len(v) for v in list(self._held.values()))

    def acquire_read(self, frame: FrameType | None = None) -> None:
        me = threading.get_ident()
        with self._cond:
            if me in self._held:
                self._drop_stale(me)
            nested = bool(self._held.get(me))
            while (self._writer is not None and self._writer != me) or (
                self._writers_waiting and not nested and self._writer != me
            ):
                self._cond.wait()
            self._held.setdefault(me, []).append(frame)

    def release_read(self, frame: FrameType | None = None) -> None:
        me = threading.get_ident()
        with self._cond:
            held = self._held.get(me)
            if not held:
                return
            for i in range(len(held) - 1, -1, -1):
                if held[i] is frame:
                    del held[i]
                    break
            else:
                return  # this call never took the read side
            if not held:
                del self._held[me]
            if not self._held:
                self._cond.notify_all()

    def _drop_stale(self, only: int | None = None) -> None:
        """Forget reads whose forward frame is no longer on its thread's stack (see the class doc)."""
        tops = {only: sys._getframe()} if only == threading.get_ident() else sys._current_frames()
        for tid in [only] if only is not None else list(self._held):
            held = self._held.get(tid)
            if not held:
                continue
            live = _stack_ids(tops.get(tid))
            held[:] = [f for f in held if f is None or id(f) in live]
            if not held:
                del self._held[tid]
        if not self._held:
            self._cond.notify_all()

    def __enter__(self) -> ReadWriteLock:
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                return self
            self._writers_waiting += 1
            try:
                while True:
                    if self._writer is None and self._held:
                        self._drop_stale()
                    if self._writer is None and not self._held:
                        break
                    # With readers held, wake up now and then: a forward left by an interrupt never notifies.
                    self._cond.wait(STALE_POLL_S if self._held else None)
            finally:
                self._writers_waiting -= 1
            self._writer = me
            self._depth = 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._writer = None
                self._cond.notify_all()


class ForwardGate:
    """The pair of forward hooks on the root model: a forward holds the read side of `lock` throughout.

    The gate stays on the model after the last adapter is removed (it holds no tensors and changes no
    output), so a forward that starts while nothing is attached still waits for, or is waited for
    by, the next attach. Only a forward already running before the very first attach on a model is
    outside it. Under torch.compile the hooks do nothing (a compiled graph is not locked).
    """

    def __init__(self) -> None:
        self.lock = ReadWriteLock()

    def enter(self, module: torch.nn.Module, args: Any) -> None:
        if not torch.compiler.is_compiling():
            self.lock.acquire_read(forward_frame(sys._getframe(1)))

    def exit(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.compiler.is_compiling():
            self.lock.release_read(forward_frame(sys._getframe(1)))

    # A copy or an unpickled model gets its own lock (locks cannot be copied or pickled).
    def __deepcopy__(self, memo: dict) -> ForwardGate:
        return ForwardGate()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.lock = ReadWriteLock()


def gate_of(model: torch.nn.Module) -> ForwardGate:
    """The model's gate, installed on first use (found again through the hooks, also in a deep copy)."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, ForwardGate):
            return owner
    gate = ForwardGate()
    model.register_forward_pre_hook(gate.enter)
    model.register_forward_hook(gate.exit, always_call=True)
    return gate


class EngineState:
    """Everything the engine keeps for one model."""

    def __init__(self, gate: ForwardGate) -> None:
        self.records: dict[str, Record] = {}
        self.snapshots: dict[str, Snapshot] = {}
        self.gate = gate
        # Switching: per wrapped layer, each adapter's slots; and the active tuples of every set seen so
        # far, so switching back to a known set is one attribute assignment per layer.
        self.plan: list[tuple[Any, list[tuple[str, tuple[Any, ...]]]]] | None = None
        self.switch_cache: dict[tuple[str, ...], list[tuple[Any, tuple[Any, bool]]]] = {}

    @property
    def lock(self) -> ReadWriteLock:
        return self.gate.lock

    def invalidate(self) -> None:
        """The set of wrapped layers or slots changed: forget the switching tables."""
        self.plan = None
        self.switch_cache = {}

    def __deepcopy__(self, memo: dict) -> EngineState:
        new = EngineState.__new__(EngineState)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            setattr(new, key, copy.deepcopy(value, memo))
        new.invalidate()
        return new

    def __getstate__(self) -> dict:
        return {**self.__dict__, "plan": None, "switch_cache": {}}


def get_state(model: torch.nn.Module, create: bool = False) -> EngineState | None:
    state = model.__dict__.get(ATTR)
    if state is None and create:
        state = EngineState(gate_of(model))
        model.__dict__[ATTR] = state
    return state


def drop_state(model: torch.nn.Module) -> None:
    """Forget the bookkeeping once nothing is attached; the gate hooks stay (see `ForwardGate`)."""
    model.__dict__.pop(ATTR, None)
