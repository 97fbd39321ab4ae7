"""`GET /metrics` of one replica, in Prometheus' text format: requests by route and status, latency,
batch sizes, queue depth, and the adapter store's hits, misses, evictions and bytes.

Each replica answers for itself (a scrape reaches the replica Ray routes it to); Ray's own metrics
(`ray_serve_*`, per deployment) are on each node's metrics export port when Ray runs with metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zimage_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("zimage_request_seconds", "time to answer a request", ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.batches = Histogram("zimage_batch_size", "requests per batch", registry=r,
                                 buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.queue = Gauge("zimage_queue_depth", "requests held by the replica (queued + running)", registry=r)
        self.store = Gauge("zimage_store", "adapter store counters and sizes", ["stat"], registry=r)

    def answered(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ("/generate", "/v1/images/generations", "/health", "/stats", "/metrics") else "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, size: int) -> None:
        self.batches.observe(size)

    def exposition(self, engine: Any, pending: int) -> tuple[bytes, str]:
        self.queue.set(pending)
        for name, value in engine.stats()["store"].items():
            self.store.labels(name).set(value)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
