"""What a public change holds while it runs: one `Scope` over the components of what the caller passed,
with each component's write lock and transaction. All are finished together or all rolled back.

Interrupts (KeyboardInterrupt, SystemExit) can arrive at any call. The steps that must not stop half
way (rolling back, releasing a state left empty, unlocking) are written to be safe to run again, so an
interrupt inside one of them runs it again to the end and is raised afterwards (`_to_the_end`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from ..errors import LoRAError
from .components import Component, components_of
from .state import EngineState, Record, get_state
from .transaction import Transaction, release


def _model_of(model: Any) -> nn.Module:
    """The transformer: the model itself, or a pipeline's `.transformer`."""
    return components_of(model)[0].module


class Scope:
    """`with Scope(parts, create) as scope:` one change over `parts` (see the module doc).

    Locks are taken in the components' order (the transformer first), so two changes cannot wait on
    each other. `create`: components whose engine state is made when absent (an apply); the others
    without a state get no transaction. Records are looked up inside the scope, never before: a state
    that a concurrent remove dropped while we waited for its lock is not used (we look again).
    """

    __slots__ = ("entries", "_held", "_create")

    def __init__(self, parts: list[Component], create: frozenset[str] | set[str] = frozenset()) -> None:
        self.entries: list[tuple[Component, Transaction | None]] = [(c, None) for c in parts]
        self._held: list[Any] = []
        self._create = create

    def __enter__(self) -> Scope:
        try:
            for i, (c, _) in enumerate(self.entries):
                state = self._lock(c.module, c.part in self._create)
                if state is not None:
                    self.entries[i] = (c, Transaction(c.module, state))
        except BaseException:
            _to_the_end(self._unlock)
            raise
        return self

    def _lock(self, model: nn.Module, create: bool) -> EngineState | None:
        while True:
            state = get_state(model, create=create)
            if state is None:
                return None
            lock = state.lock
            lock.__enter__()
            self._held.append(lock)
            if get_state(model) is state:
                return state
            self._held.pop()
            lock.__exit__(None, None, None)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        txns = self.txns()
        interrupt = None
        try:
            if exc_type is None:
                try:
                    for t in txns:
                        t.finish()
                except BaseException:
                    interrupt = _to_the_end(lambda: _rollback(txns))
                    raise
            else:
                interrupt = _to_the_end(lambda: _rollback(txns))
        finally:
            late = _to_the_end(lambda: _release_empty(txns))
            late = _to_the_end(self._unlock) or late
            interrupt = interrupt or late
            if interrupt is not None:
                raise interrupt

    def _unlock(self) -> None:
        while self._held:
            self._held[-1].__exit__(None, None, None)
            self._held.pop()

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


def _release_empty(txns: list[Transaction]) -> None:
    for t in txns:
        if not t.state.records:
            release(t.model, t.state)


def _to_the_end(step: Callable[[], None]) -> BaseException | None:
    """Run `step` (safe to run again) until it completes; an interrupt inside it runs it again and is
    returned, to be raised once the change is consistent. Errors (`Exception`) propagate as they are."""
    interrupt = None
    while True:
        try:
            step()
            return interrupt
        except Exception:
            raise
        except BaseException as exc:  # KeyboardInterrupt, SystemExit
            interrupt = interrupt or exc


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
