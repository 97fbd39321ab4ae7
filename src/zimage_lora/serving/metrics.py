"""`GET /metrics` in Prometheus' text format: the ingress's requests by route and status and their
latency, and the model replica's batch sizes, queue depth and adapter store counters (hits, misses,
evictions, bytes). A scrape reaches one ingress replica and, through it, one model replica: scrape
each replica (or sum Ray's own `ray_serve_*` metrics, on each node's metrics export port when Ray
runs with metrics) for cluster totals.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = ("/generate", "/v1/images/generations", "/health", "/stats", "/metrics")


class RequestMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("zimage_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("zimage_request_seconds", "time to answer a request", ["route"], registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))

    def answered(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class BatchMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.batches = Histogram("zimage_batch_size", "requests per batch", registry=r,
                                 buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32))
        self.queue = Gauge("zimage_queue_depth", "requests held by the replica (queued + running)", registry=r)
        self.store = Gauge("zimage_store", "adapter store counters and sizes", ["stat"], registry=r)

    def batch(self, size: int) -> None:
        self.batches.observe(size)

    def exposition(self, engine: Any, pending: int) -> bytes:
        self.queue.set(pending)
        for name, value in engine.stats()["store"].items():
            self.store.labels(name).set(value)
        return generate_latest(self.registry)
