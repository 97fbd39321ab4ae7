"""What a public change holds while it runs: one `Scope` over the components of what the caller passed,
with each component's write lock and transaction. All are finished together or all rolled back.

Interrupts (KeyboardInterrupt, SystemExit) can arrive at any call. Closing a scope (finishing or rolling
back, releasing a state left empty, unlocking) is written to be safe to run again, so an interrupt
inside it runs it again to the end and is raised afterwards (`Scope.run`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn

from ..errors import LoRAError
from .components import Component, components_of
from .gate import ATTR, ChangeLock, end_change
from .state import EngineState, Record, get_state
from .transaction import Transaction, release

T = TypeVar("T")

def _model_of(model: Any) -> nn.Module:
    """The transformer: the model itself, or a pipeline's `.transformer`."""
    return components_of(model)[0].module


class Scope:
    """`Scope(parts, create).run(change)`: `change(scope)` as one change over `parts` (see the module doc).

    Locks are taken in the components' order (the transformer first), so two changes cannot wait on
    each other. `create`: components whose engine state is made when absent (an apply); the others
    without a state get no transaction. Records are looked up inside the change, never before: a state
    that a concurrent remove dropped while we waited for its lock is not used (we look again).

    Not a `with` block: an interrupt on entry to `__exit__` would skip it whole (no rollback, locks
    held). `run` closes the scope in a loop that runs the close again until it completes.
    """

    __slots__ = ("entries", "_held", "_create", "_failed", "_finished")

    def __init__(self, parts: list[Component], create: frozenset[str] | set[str] = frozenset()) -> None:
        self.entries: list[tuple[Component, Transaction | None]] = [(c, None) for c in parts]
        self._held: list[ChangeLock] = []
        self._create = create
        self._failed = False
        self._finished = False

    def run(self, change: Callable[[Scope], T]) -> T:
        self._open()
        ok = False
        try:
            result = change(self)
            ok = True
        finally:
            interrupt = None
            while True:  # no call between the loop and `_close`: an interrupt on its entry is caught here
                try:
                    self._close(ok)
                    break
                except (KeyboardInterrupt, SystemExit) as exc:
                    interrupt = interrupt or exc
            if interrupt is not None:
                raise interrupt
        return result

    def _open(self) -> None:
        try:
            for i, (c, _) in enumerate(self.entries):
                state = self._lock(c.module, c.part in self._create)
                if state is not None:
                    self.entries[i] = (c, Transaction(c.module, state))
        except BaseException:
            self._failed = True
            while True:
                try:
                    self._close(False)
                    break
                except (KeyboardInterrupt, SystemExit):
                    pass
            raise

    def _lock(self, model: nn.Module, create: bool) -> EngineState | None:
        return lock_state(model, create, self._held)

    def _close(self, ok: bool) -> None:
        """Finish every transaction, or roll every one back; release states left empty; unlock. Safe to
        run again after an interrupt stopped it (an interrupt inside `finish` rolls the change back).
        An error here is raised once the locks are released."""
        txns = self.txns()
        error: Exception | None = None
        if ok and not self._failed and not self._finished:
            self._failed = True  # until every finish has run
            try:
                for t in txns:
                    t.finish()
            except Exception as exc:
                error = exc
            else:
                self._failed, self._finished = False, True
        if self._failed or not ok:
            self._failed = True
            try:
                _rollback(txns)
            except Exception as exc:
                error = error or exc
        try:
            for t in txns:
                if not t.state.records:
                    release(t.model, t.state)
        except Exception as exc:
            error = error or exc
        while self._held:
            lock = self._held[-1]
            end_change(lock)  # still held: publish the result to the forwards that start from now
            lock.__exit__(None, None, None)
            self._held.pop()
        if error is not None:
            raise error

    # --- what a change reads ----------------------------------------------------------------------
    def txns(self) -> list[Transaction]:
        return [t for _, t in self.entries if t is not None]

    def names(self) -> list[str]:
        """Every attached adapter name over the components, in the order they were applied."""
        return list(dict.fromkeys(n for t in self.txns() for n in t.state.records))

    def holding(self, name: str) -> list[tuple[Transaction, Record]]:
        """The transaction and record of each component holding `name`."""
        return [(t, t.state.records[name]) for t in self.txns() if name in t.state.records]

    def not_attached(self, names: list[str]) -> LoRAError:
        which = f"'{names[0]}'" if len(names) == 1 else str(names)
        return LoRAError(
            f"no adapter named {which} is attached; attached: {self.names() or 'none'}. "
            "list_adapters(model) shows them."
        )


def lock_state(model: nn.Module, create: bool, held: list[ChangeLock]) -> EngineState | None:
    """`model`'s engine state with its change lock taken and appended to `held` (None, nothing taken: no
    state, and not `create`). A state that a concurrent remove dropped while we waited is not used: we
    look again."""
    while True:
        state = get_state(model, create=True) if create else model.__dict__.get(ATTR)
        if state is None:
            return None
        lock = state.gate.lock
        lock.__enter__()
        held.append(lock)
        if model.__dict__.get(ATTR) is state:
            return state
        held.pop()
        lock.__exit__(None, None, None)


def _rollback(txns: list[Transaction]) -> None:
    """Every component rolled back, also when one's rollback fails (its error is raised after)."""
    error = None
    for t in reversed(txns):
        try:
            t.rollback()
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error


def iter_records(parts: list[Component]) -> Iterator[tuple[Component, Record]]:
    """Each component's attached records, without any lock: one atomic copy of each state's records."""
    for c in parts:
        state = get_state(c.module)
        if state is not None:
            for r in list(state.records.values()):
                yield c, r


def attached(model: nn.Module, name: str) -> Record | None:
    """The record of the adapter `name` on `model` (None when not attached); the adapter store reads it."""
    state = get_state(_model_of(model))
    return None if state is None else state.records.get(name)
