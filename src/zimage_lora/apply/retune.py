"""The hot path of re-weighting and switching: a change that sets only records' strengths and which of
them are active, with no slot, wrapper or weight touched (dynamic adapters within their overflow
headroom; a merged adapter only where its weights stay as they are).

It keeps every promise of a full change (`apply.access.Scope`): each component's change lock, taken in
the components' order; every check of every component before the first write; all or nothing; the
result published to forwards at the end, never part of it. What it saves is the `Transaction`: nothing
but these record fields changes, so their old values are the whole undo. The caller runs anything
else, and every refusal (its error messages live there), as a full change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from torch import nn

from ..blocks import Blocks
from .access import lock_state
from .components import Component
from .gate import ChangeLock, end_change
from .state import EngineState, Record
from .switching import publish_fast


def retune(parts: list[Component], values: Mapping[str, float], active: Collection[str] | None = None) -> bool:
    """Set the strength of each adapter in `values` on every component holding it and, unless `active`
    is None, make exactly `active` active. Returns False, having changed nothing, when the change is
    not of this kind: a name not attached, a merged adapter whose weights would change, a strength past
    a record's overflow headroom (the caller runs it as a full change, which checks it in full)."""
    locks: list[ChangeLock] = []
    undo: list[tuple[Record, bool, float | Blocks]] = []
    switched: list[tuple[nn.Module, EngineState]] = []
    done = False
    try:
        todo: list[tuple[Record, bool, float | None]] = []
        seen: set[str] = set()
        switches: list[tuple[nn.Module, EngineState]] = []
        for c in parts:
            state = lock_state(c.module, False, locks)
            if state is None:
                continue
            seen.update(state.records)
            flipped = False
            for name, record in state.records.items():
                on = record.active if active is None else name in active
                value = values.get(name)
                if value is not None and record.wrapped and abs(value) > record.headroom:
                    return False  # may overflow: the full check decides
                if record.patches and (on != record.active or (on and value is not None
                                                               and value != record.strength.get())):
                    return False  # merged weights to rebuild
                if on != record.active or value is not None:
                    todo.append((record, on, value))
                    flipped = flipped or on != record.active
            if flipped:
                switches.append((c.module, state))
        if not seen.issuperset(values if active is None else active):
            return False  # the full change says which name is not attached
        for record, on, value in todo:
            undo.append((record, record.active, record.strength.get()))
            record.active = on
            if value is not None:
                record.strength.set(value)
        for model, state in switches:
            switched.append((model, state))
            publish_fast(model, state)  # each wrapper's active tuple for the new set (one store per layer)
        done = True
    finally:
        interrupt: BaseException | None = None
        while True:  # no call between the loop and `_end`: an interrupt on its entry is caught here
            try:
                _end(locks, undo, switched, done)
                break
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt
    return True


def _end(locks: list[ChangeLock], undo: list[tuple[Record, bool, float | Blocks]],
         switched: list[tuple[nn.Module, EngineState]], done: bool) -> None:
    """Undo (unless `done`), publish and unlock; safe to run again after an interrupt stopped it."""
    if not done:
        for record, active, value in undo:
            record.active = active
            record.strength.set(value)
        for model, state in switched:
            publish_fast(model, state)
    while locks:
        lock = locks[-1]
        end_change(lock)  # still held: publish the result to the forwards that start from now
        lock.__exit__(None, None, None)
        locks.pop()
