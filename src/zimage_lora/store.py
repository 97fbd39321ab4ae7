"""`AdapterStore`: prepared adapters keyed by their source, for serving many adapters on one model.

Two tiers, each an LRU under a byte budget:
- host: the parsed, resolved `Adapter` (loaded once per source; concurrent requests for one source
  wait for the same load). On CUDA its tensors are pinned, so the upload can be asynchronous.
- device: the adapter attached to the model in dynamic mode, inactive (per-sample blocks name it).
  On CUDA a cold adapter is uploaded on a side stream with `non_blocking` copies as soon as a lease
  is taken, so the copy overlaps whatever batch is running; attaching waits for that copy only.

`store.lease(sources)` pins the sources (no tier evicts a pinned entry) and loads them; a source that
fails (missing, unsafe, outside the allowed roots, bad file) is kept in `lease.errors` and fails only
the requests that name it. `with lease:` attaches what is not on the device and holds the store's run
lock, so adapters are attached and evicted only between batches, never under a running forward.
The strength is not part of the key: it is per request (`lease.spec`). The source policy, loading
and the upload itself are in `store_loader`.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import Adapter
from .apply.attach import apply_resolved
from .apply.engine import _model_of, attached, remove_adapter
from .errors import InvalidArgumentError, LoRAError
from .mlx.probe import refuse
from .store_loader import load_host, source_key, stage_upload

LOAD_TIMEOUT_S = 600.0


@dataclass
class StoreStats:
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
    device_hits: int = 0
    device_misses: int = 0
    device_evictions: int = 0
    load_errors: int = 0
    host_bytes: int = 0
    device_bytes: int = 0
    host_entries: int = 0
    device_entries: int = 0


@dataclass
class _Entry:
    key: str
    adapter: Adapter
    host_bytes: int
    pins: int = 0
    name: str | None = None  # attached under this name (device tier)
    device_bytes: int = 0
    staged: tuple[Adapter, Any] | None = None  # CUDA: (device copy, copy-done event) awaiting attach


class AdapterStore:
    """Adapters for one model (or pipeline), by source, within a host and a device byte budget.

    `roots`: if given, local sources must resolve (symlinks followed) inside one of these folders;
    relative sources are looked up under them. `allow_hub`: whether `org/name` ids may be loaded
    (through the Hugging Face cache and, unless offline, the Hub). Budgets of None are unlimited.
    """

    def __init__(
        self,
        model: Any,
        *,
        host_budget_bytes: int | None = 4 << 30,
        device_budget_bytes: int | None = None,
        roots: Sequence[str | Path] | None = None,
        allow_hub: bool = True,
    ) -> None:
        refuse(model, "AdapterStore")
        self.model: nn.Module = _model_of(model)
        self.host_budget = host_budget_bytes
        self.device_budget = device_budget_bytes
        self.roots = [Path(os.path.realpath(r)) for r in roots] if roots is not None else None
        self.allow_hub = allow_hub
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._device: OrderedDict[str, _Entry] = OrderedDict()
        self._loading: dict[str, Future[_Entry]] = {}
        self._lock = threading.Lock()  # the tables and counters (held briefly, never during I/O)
        self._run = threading.Lock()  # one lease at a time attaches and runs on the model
        self._stats = StoreStats()
        self._names = 0
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self._cuda = device if device.type == "cuda" else None
        self._stream = torch.cuda.Stream(device) if self._cuda is not None else None

    # -- keys and the allow-list (the policy itself: store_loader.source_key) ----------------------
    def key(self, source: str | Path) -> str:
        """The cache key of `source`: its real path, or the hub id. Refuses what the policy forbids."""
        return source_key(source, self.roots, self.allow_hub)

    # -- host tier ----------------------------------------------------------------------------------
    def _acquire(self, source: str | Path) -> _Entry:
        """The source's entry, loaded if needed, with one more pin."""
        key = self.key(source)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._stats.host_hits += 1
                self._entries.move_to_end(key)
                entry.pins += 1
                return entry
            pending = self._loading.get(key)
            owner = pending is None
            future: Future[_Entry] = Future() if pending is None else pending
            if owner:
                self._loading[key] = future
                self._stats.host_misses += 1
            else:
                self._stats.host_hits += 1  # loaded once, by the request that asked first
        if not owner:
            entry = future.result(timeout=LOAD_TIMEOUT_S)  # re-raises the loader's LoRAError
            with self._lock:
                entry.pins += 1
            return entry
        try:
            adapter = self._load(key)
        except BaseException as exc:
            with self._lock:
                self._stats.load_errors += 1
                del self._loading[key]
            future.set_exception(exc)
            raise
        entry = _Entry(key, adapter, adapter.nbytes(), pins=1)
        with self._lock:
            self._entries[key] = entry
            del self._loading[key]
            self._evict_host()
        future.set_result(entry)
        return entry

    def _load(self, key: str) -> Adapter:
        return load_host(key, self.model, pin=self._cuda is not None)

    def _evict_host(self) -> None:
        """Drop least recently used unpinned, unattached adapters until the host tier fits (lock held)."""
        if self.host_budget is None:
            return
        for key in list(self._entries):
            if self._host_bytes() <= self.host_budget:
                return
            entry = self._entries[key]
            if entry.pins == 0 and entry.name is None:
                del self._entries[key]
                self._stats.host_evictions += 1

    def _host_bytes(self) -> int:
        return sum(e.host_bytes for e in self._entries.values())

    # -- leases and the device tier ---------------------------------------------------------------------
    def lease(self, sources: Iterable[str | Path]) -> Lease:
        """Pin and load `sources` (duplicates once); failures are kept per source in `lease.errors`."""
        lease = Lease(self)
        try:
            for source in dict.fromkeys(str(s) for s in sources):
                try:
                    entry = self._acquire(source)
                except LoRAError as exc:
                    lease.errors[source] = exc
                    continue
                lease.entries[source] = entry
                self._stage(entry)
        except BaseException:  # an unexpected failure: unpin what this lease took, or the pins would leak
            lease.close()
            raise
        return lease

    def _stage(self, entry: _Entry) -> None:
        """CUDA: start the cold adapter's upload now, on the side stream (it overlaps a running batch)."""
        if self._stream is None or self._cuda is None:
            return
        with self._lock:
            if entry.name is not None or entry.staged is not None:
                return
            entry.staged = stage_upload(entry.adapter, self._cuda, self._stream)

    def _attach(self, entry: _Entry) -> None:
        """Device tier, under the run lock: attach the adapter (inactive) unless it already is."""
        with self._lock:
            if entry.name is not None:
                self._stats.device_hits += 1
                self._device.move_to_end(entry.key)
                return
            self._stats.device_misses += 1
            self._names += 1
            name = f"store{self._names}"
            adapter, done = entry.staged if entry.staged is not None else (entry.adapter, None)
        if done is not None:
            torch.cuda.current_stream(self._cuda).wait_event(done)
        _attach_inactive(self.model, adapter, name)
        record = attached(self.model, name)
        assert record is not None  # attached just above
        size = 0
        for module, keys in record.wrapped.items():
            slots: Any = self.model.get_submodule(module).slots  # an AdapterLinear's slots
            for k in keys:
                size += sum(getattr(slots[k], t).numel() * getattr(slots[k], t).element_size() for t in slots[k].names)
        with self._lock:
            entry.name, entry.device_bytes, entry.staged = name, size, None
            self._device[entry.key] = entry

    def _evict_device(self) -> None:
        """Detach least recently used unpinned adapters until the device tier fits (run lock held)."""
        if self.device_budget is None:
            return
        for key in list(self._device):
            with self._lock:
                total = sum(e.device_bytes for e in self._device.values())
                entry = self._device[key]
                if total <= self.device_budget:
                    return
                if entry.pins:
                    continue
                name = entry.name
                entry.name, entry.device_bytes = None, 0
                del self._device[key]
                self._stats.device_evictions += 1
            remove_adapter(self.model, name)
        with self._lock:
            self._evict_host()  # detached adapters count against the host budget again

    def _release(self, entries: Iterable[_Entry]) -> None:
        with self._lock:
            for entry in entries:
                entry.pins -= 1
            self._evict_host()

    def holds(self, sources: Iterable[str | Path]) -> bool:
        """Whether every source is in the host tier now (a lease of them would read nothing from disk).
        A source the policy refuses is not held."""
        try:
            keys = [self.key(s) for s in sources]
        except LoRAError:
            return False
        with self._lock:
            return all(k in self._entries for k in keys)

    def stats(self) -> StoreStats:
        with self._lock:
            return replace(
                self._stats,
                host_bytes=self._host_bytes(),
                device_bytes=sum(e.device_bytes for e in self._device.values()),
                host_entries=len(self._entries),
                device_entries=len(self._device),
            )

    def clear(self) -> None:
        """Detach every adapter this store attached and forget everything not pinned."""
        with self._run:
            for entry in list(self._device.values()):
                if entry.pins == 0 and entry.name is not None:
                    remove_adapter(self.model, entry.name)
                    with self._lock:
                        entry.name, entry.device_bytes = None, 0
                        del self._device[entry.key]
            with self._lock:
                for key in [k for k, e in self._entries.items() if e.pins == 0 and e.name is None]:
                    del self._entries[key]


def _attach_inactive(model: nn.Module, adapter: Adapter, name: str) -> None:
    """Attach `adapter` as `name`, dynamic and inactive, in one change: store adapters act only through
    per-sample blocks, so no forward on another thread ever runs with one active."""
    apply_resolved(model, adapter, name=name, mode="dynamic", strength=1.0, compute_dtype=None, active=False)


@dataclass
class Lease:
    """Pinned adapters for one batch. `with lease:` attaches them and holds the model for the batch."""

    store: AdapterStore
    entries: dict[str, _Entry] = field(default_factory=dict)
    errors: dict[str, LoRAError] = field(default_factory=dict)
    _released: bool = False

    def __enter__(self) -> Lease:
        self.store._run.acquire()
        try:
            for source, entry in list(self.entries.items()):
                try:
                    self.store._attach(entry)
                except LoRAError as exc:  # e.g. the file resolved but does not fit the model
                    self.errors[source] = exc
                    del self.entries[source]
                    self.store._release([entry])
            self.store._evict_device()
        except BaseException:
            self.store._run.release()
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.store._run.release()
        self.close()

    def close(self) -> None:
        """Unpin (idempotent); a lease never entered is closed this way."""
        if not self._released:
            self._released = True
            self.store._release(self.entries.values())

    def failure(self, sources: Iterable[str | Path]) -> LoRAError | None:
        """The error of the first of `sources` that failed, if any."""
        return next((self.errors[str(s)] for s in sources if str(s) in self.errors), None)

    def name(self, source: str | Path) -> str:
        """The name `source` is attached under (inside `with`); its load error if it failed."""
        error = self.errors.get(str(source))
        if error is not None:
            raise error
        name = self.entries[str(source)].name
        assert name is not None  # attached by __enter__
        return name

    def spec(self, loras: Iterable[tuple[str | Path, float | Mapping[str, float]]]) -> dict[str, Any]:
        """A per-sample spec {attached name: strength} for (source, strength) pairs (inside `with`); a
        strength is a number or per block {pattern: number}. The same source twice adds its numbers, as
        attaching it twice would (per-block strengths cannot be added: InvalidArgumentError)."""
        out: dict[str, Any] = {}
        for source, strength in loras:
            name = self.name(source)
            if name not in out:
                out[name] = strength if isinstance(strength, Mapping) else float(strength)
            elif isinstance(strength, Mapping) or isinstance(out[name], Mapping):
                raise InvalidArgumentError(f"{source}: given twice with a per-block strength; give it once")
            else:
                out[name] += float(strength)
        return out
