"""A function run on its own thread for the concurrency tests, with a bounded join."""

from __future__ import annotations

import threading
from collections.abc import Callable

JOIN_S = 20.0  # far above what any step takes; reached only by a deadlock


class Worker:
    """`fn` in a daemon thread; `finished(timeout)` says whether it returned, `error` what it raised."""

    def __init__(self, fn: Callable[[], object], name: str | None = None) -> None:
        self.error: BaseException | None = None
        self.result: object = None

        def run() -> None:
            try:
                self.result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True, name=name)
        self.thread.start()

    def finished(self, timeout: float = JOIN_S) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()
