"""The model deployment: one replica = a ZImagePipeline, its adapter store, and the batching queue in
front of them. It is called by the HTTP ingress (`app`) through a deployment handle, never by HTTP.

Concurrent calls are gathered by `@serve.batch` into one batch whatever their adapter sets, and run
as per-sample batches (`Engine.run`). Each call's adapters are read into the host tier as soon as it
arrives, in a thread (the event loop keeps answering), so disk reads overlap the running batch. A
replica holds at most `max_queue` requests; more are answered 503 at once.

Adapter affinity: the ingress names each call's adapter set as its multiplexed model id, and this
replica records the sets it served (`@serve.multiplexed`); Ray Serve's router sends a call to a
replica that already has its set when one is not overloaded, so with N replicas the catalogue is
split between them instead of every replica caching the same adapters. After each call the replica
advertises only the sets whose adapters its store still holds (`advertise_held`): a set the store
evicted would draw requests that then read from disk anyway, and keep them from a replica with room.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
from typing import Any

from ray import serve

from ..errors import LoRAError
from .core import Engine, InternalError, Job, ServeOptions, http_status, log
from .metrics import BatchMetrics

AFFINITY_SETS = 256  # upper bound of the sets one replica advertises (the store's budget bounds them first)
MULTIPLEX_ATTR = "__serve_multiplex_wrapper"  # where Ray Serve keeps a replica's multiplexed ids (ray 2.x)
Outcome = bytes | tuple[int, str]  # a PNG, or (HTTP status, message)


def log_to_stderr() -> None:
    if not log.handlers:  # the replica's stderr: the serving process's stderr when Ray forwards it
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("zimage-lora %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def loopback_replica_server() -> None:
    """On a loopback-only node, bind the replica's inter-deployment gRPC server to 127.0.0.1 too
    (Ray Serve binds it to every interface, whatever the node's address); called in the replica's
    constructor, which runs before Ray starts that server."""
    import ray
    from ray.serve._private import replica as replica_module

    replica: Any = replica_module  # Ray's private module: patched by name, typed loosely
    # ray.util.get_node_ip_address is unannotated in ray
    if ray.util.get_node_ip_address() != "127.0.0.1" or getattr(replica, "_zimage_loopback", False):  # type: ignore[no-untyped-call]
        return
    add_port = replica.add_port_to_grpc_server

    def loopback(server: Any, address: str) -> Any:
        return add_port(server, address.replace("[::]", "127.0.0.1", 1))

    replica.add_port_to_grpc_server = loopback
    replica._zimage_loopback = True


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, graceful_shutdown_timeout_s=60)
class ZImageServer:
    def __init__(self, options: dict[str, Any]) -> None:
        log_to_stderr()
        loopback_replica_server()
        self.options = ServeOptions.from_dict(options)
        self.engine = Engine(self.options)
        batched: Any = self.generate_batched  # Ray's batch wrapper, with its setters
        batched.set_max_batch_size(self.options.max_batch_size)
        batched.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)
        self.pending = 0  # requests (images) taken and not yet answered: the bounded queue
        self.metrics = BatchMetrics()
        self.sets: dict[str, tuple[str, ...]] = {}  # advertised set id -> its sources

    @serve.multiplexed(max_num_models_per_replica=AFFINITY_SETS)  # type: ignore[untyped-decorator]  # unannotated in ray
    async def adapter_set(self, key: str) -> str:
        return key  # nothing to hold (the store keeps the adapters): this records the affinity Ray routes by

    async def run(self, jobs: list[Job]) -> list[Outcome]:
        """The jobs of one HTTP request: a PNG each, or (status, message)."""
        key = serve.get_multiplexed_model_id()
        if key:
            self.sets[key] = tuple(s for s, _ in jobs[0].loras)
            await self.adapter_set(key)
            # Ray Serve's @serve.batch splits batches by model id: drop it, so any mix shares a batch.
            context = serve.context._get_serve_request_context()
            without_id = dataclasses.replace(context, multiplexed_model_id="")
            serve.context._serve_request_context.set(without_id)  # type: ignore[arg-type]  # ray types the var as its own class
        if self.pending + len(jobs) > self.options.max_queue:
            message = f"the server is busy ({self.pending} requests queued, at most {self.options.max_queue})"
            self.advertise_held()  # this request's set, recorded above, is not held: not advertised either
            return [(503, message)] * len(jobs)
        self.pending += len(jobs)
        try:
            sources = [s for s, _ in jobs[0].loras]  # every job of one request names the same adapters

            def read_and_check() -> None:
                # Read the adapters now (host tier); their failures surface in the batch, per request.
                self.engine.store.lease(sources).close()
                # What only the model can tell (per-block patterns) is refused before joining a batch.
                self.engine.check(jobs[0])

            try:  # in a thread: the event loop keeps answering
                await asyncio.to_thread(read_and_check)
            except LoRAError as exc:
                return [(http_status(exc), str(exc))] * len(jobs)
            results = await asyncio.gather(*(self.generate_batched(job) for job in jobs))
        finally:
            self.pending -= len(jobs)
            self.advertise_held()
        return [r if isinstance(r, bytes) else (http_status(r), str(r)) for r in results]

    def advertise_held(self) -> list[str]:
        """Withdraw the advertised sets whose adapters the store no longer holds (or never loaded), so the
        router's picture is what this replica holds within its budget; returns the withdrawn ids."""
        wrapper: Any = getattr(self, MULTIPLEX_ATTR, None)
        models = getattr(wrapper, "models", None)
        if wrapper is None or models is None:  # no set recorded yet (or another Ray layout: affinity then only records)
            return []
        stale = [k for k in list(models) if not self.engine.store.holds(self.sets.get(k, ("",)))]
        for k in stale:
            models.pop(k, None)
        for k in set(self.sets) - set(models):  # also the ids Ray's own LRU dropped
            del self.sets[k]
        if stale:
            wrapper._push_multiplexed_replica_info = True  # Ray pushes the new list within 0.1 s
        return stale

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batched(self, jobs: list[Job]) -> list[bytes | LoRAError | InternalError]:
        self.metrics.batch(len(jobs))
        try:
            # In a thread: the replica's event loop keeps answering health checks and queueing requests.
            return await asyncio.to_thread(self.engine.run, jobs)
        except LoRAError as exc:  # a failure of the whole batch before any request ran
            return [exc] * len(jobs)
        except Exception as exc:  # noqa: BLE001 - a bug outside any one request: every request gets a 500
            log.error("batch of requests %s failed", [j.request_id for j in jobs], exc_info=exc)
            return [InternalError(j.request_id, exc) for j in jobs]

    async def stats(self) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id()  # which node and replica answered (tests, debugging)
        replica = serve.get_replica_context().replica_id.unique_id
        advertised = len(getattr(getattr(self, MULTIPLEX_ATTR, None), "models", ()))
        return {**self.engine.stats(), "pending": self.pending, "node": node, "replica": replica,
                "advertised_sets": advertised}

    async def busy(self) -> tuple[str, int]:
        """(this replica's id, requests it holds): what a drain waits on."""
        return serve.get_replica_context().replica_id.unique_id, self.pending

    async def metrics_text(self) -> bytes:
        return self.metrics.exposition(self.engine, self.pending)

    def check_health(self) -> None:
        """Ray's replica health check: the engine was built (the constructor raises otherwise)."""
        if self.engine is None:
            raise RuntimeError("engine not ready")
