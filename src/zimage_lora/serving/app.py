"""The Ray Serve application: `GET /health`, `POST /generate` (JSON in, PNG out), the OpenAI-shaped
`POST /v1/images/generations`, `GET /stats` and `GET /metrics`.

Concurrent requests are gathered by `@serve.batch` into one batch whatever their adapter sets, and
run as per-sample batches (`Engine.run`). Each request's adapters are read into the host tier as
soon as it arrives, in a thread (the event loop keeps answering), so disk reads overlap the batch
that is running. A replica holds at most `max_queue` requests; more answer 503 with Retry-After.
Every answer carries Ray Serve's `X-Request-Id`; errors are JSON `{"error", "request_id"}`.

On a cluster: `ray start` on every node, then `serve run zimage_lora.serving.app:build_app model=...`
or `serve deploy` of a config naming `import_path: zimage_lora.serving.app:build_app` (README).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import sys
import time
import uuid
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..errors import InvalidFormatError, LoRAError
from .auth import authorized, load_key_hashes
from .core import Engine, InternalError, Job, ServeOptions, http_status, log
from .metrics import Metrics
from .parse import MAX_BODY, BodyTooLargeError, load_json, parse_job, parse_openai

RETRY_AFTER_S = 1
ROUTES = "GET /health, GET /stats, GET /metrics, POST /generate or POST /v1/images/generations"


class Overloaded(Exception):
    """The replica's queue is full (HTTP 503 with Retry-After)."""


def _error(message: str, status: int, rid: str, openai: bool = False, **headers: str) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "request_id": rid}
    if openai:  # the shape OpenAI clients read their error message from
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body["error"] = {"message": message, "type": kind, "code": status}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _log_to_stderr() -> None:
    if not log.handlers:  # the replica's stderr: the serving process's stderr when Ray forwards it
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("zimage-lora %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def _loopback_replica_server() -> None:
    """On a loopback-only node, bind the replica's inter-deployment gRPC server to 127.0.0.1 too
    (Ray Serve binds it to every interface, whatever the node's address); called in the replica's
    constructor, which runs before Ray starts that server."""
    import ray
    from ray.serve._private import replica

    if ray.util.get_node_ip_address() != "127.0.0.1" or getattr(replica, "_zimage_loopback", False):
        return
    add_port = replica.add_port_to_grpc_server

    def loopback(server: Any, address: str) -> Any:
        return add_port(server, address.replace("[::]", "127.0.0.1", 1))

    replica.add_port_to_grpc_server = loopback
    replica._zimage_loopback = True


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10, graceful_shutdown_timeout_s=60)
class ZImageServer:
    """One replica: a ZImagePipeline, its adapter store, and the batching queue in front of them."""

    def __init__(self, options: dict[str, Any]) -> None:
        _log_to_stderr()
        _loopback_replica_server()
        self.options = ServeOptions.from_dict(options)
        # Keys from the file (read on the replica's node) or $ZIMAGE_LORA_API_KEYS: kept as hashes only.
        self.key_hashes = sorted({*self.options.api_key_hashes, *load_key_hashes(self.options.api_key_file)})
        self.engine = Engine(self.options)
        self.generate_batched.set_max_batch_size(self.options.max_batch_size)
        self.generate_batched.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)
        self.pending = 0  # requests (images) taken and not yet answered: the bounded queue
        self.metrics = Metrics()

    async def __call__(self, request: HTTPRequest) -> Response:
        # The proxy's request id: the one it returns in X-Request-Id and writes in Ray's own logs.
        rid = serve.context._get_serve_request_context().request_id or uuid.uuid4().hex
        path = request.url.path.rstrip("/") or "/"
        openai = path.startswith("/v1/")
        start = time.perf_counter()
        try:
            response = await self._route(request, path, rid)
        except LoRAError as exc:
            response = _error(str(exc), http_status(exc), rid, openai)
        except Overloaded as exc:
            response = _error(str(exc), 503, rid, openai, **{"Retry-After": str(RETRY_AFTER_S)})
        except InternalError as exc:
            response = _error(str(exc), 500, rid, openai)
        except Exception as exc:  # noqa: BLE001 - a bug: logged with the id, answered as JSON
            log.error("request %s failed", rid, exc_info=exc)
            response = _error(f"internal error ({type(exc).__name__}); request id {rid}", 500, rid, openai)
        self.metrics.answered(path, response.status_code, time.perf_counter() - start)
        return response

    async def _route(self, request: HTTPRequest, path: str, rid: str) -> Response:
        if path == "/health":
            if request.method != "GET":
                return _error("use GET /health", 405, rid)
            return PlainTextResponse("ok")
        if not authorized(request.headers.get("authorization"), self.key_hashes):
            return _error("missing or wrong API key: send 'Authorization: Bearer KEY'", 401, rid,
                          path.startswith("/v1/"), **{"WWW-Authenticate": "Bearer"})
        routes = {"/stats": "GET", "/metrics": "GET", "/generate": "POST", "/v1/images/generations": "POST"}
        if path not in routes:
            return _error(f"not found: {ROUTES}", 404, rid)
        if request.method != routes[path]:
            return _error(f"use {routes[path]} {path}", 405, rid)
        if path == "/stats":
            return JSONResponse({**self.engine.stats(), "pending": self.pending})
        if path == "/metrics":
            body, content_type = self.metrics.exposition(self.engine, self.pending)
            return Response(body, media_type=content_type)
        body = load_json(await self._body(request))
        if path == "/generate":
            (png,) = await self._run([parse_job(body, rid)])
            return Response(png, media_type="image/png")
        pngs = await self._run(parse_openai(body, rid))
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        return JSONResponse({"created": int(time.time()), "data": data})

    async def _body(self, request: HTTPRequest) -> bytes:
        """The body, refused from its Content-Length alone when that is over the limit (nothing is
        read), and while streaming once it passes the limit (chunked bodies)."""
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise InvalidFormatError(f"Content-Length must be a number of bytes, got {length[:40]!r}")
            if int(length) > MAX_BODY:
                raise BodyTooLargeError(f"the body is {int(length)} bytes; at most {MAX_BODY}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise BodyTooLargeError(f"the body is larger than {MAX_BODY} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _run(self, jobs: list[Job]) -> list[bytes]:
        """The jobs' PNGs, or the first job's error raised; the queue bound is checked first."""
        if self.pending + len(jobs) > self.options.max_queue:
            raise Overloaded(f"the server is busy ({self.pending} requests queued, at most "
                             f"{self.options.max_queue}); retry after {RETRY_AFTER_S} s")
        self.pending += len(jobs)
        try:
            sources = [s for s, _ in jobs[0].loras]  # every job of one request names the same adapters
            # Read the adapters now (host tier), in a thread; failures surface in the batch, per request.
            await asyncio.to_thread(lambda: self.engine.store.lease(sources).close())
            results = await asyncio.gather(*(self.generate_batched(job) for job in jobs))
        finally:
            self.pending -= len(jobs)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

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

    def check_health(self) -> None:
        """Ray's replica health check: the engine was built (the constructor raises otherwise)."""
        if self.engine is None:
            raise RuntimeError("engine not ready")


def build_app(args: dict[str, Any]) -> Application:
    """The application builder for `serve run` / `serve deploy`: `args` are ServeOptions fields plus
    `replicas` (default 1), `num_gpus` per replica (default 1 when CUDA is visible, else 0),
    `num_cpus` per replica (default 1)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    num_gpus = args.pop("num_gpus", None)
    num_cpus = float(args.pop("num_cpus", 1))
    for key in ("host_budget_bytes", "device_budget_bytes", "max_batch_size", "max_queue"):
        if isinstance(args.get(key), str):
            args[key] = int(args[key])
    if isinstance(args.get("roots"), str):
        args["roots"] = [r for r in args["roots"].split(",") if r]
    if isinstance(args.get("allow_hub"), str):
        args["allow_hub"] = args["allow_hub"].lower() in ("1", "true", "yes")
    options = ServeOptions.from_dict(args)
    if num_gpus is None:
        import torch

        num_gpus = 1 if torch.cuda.is_available() and options.device in (None, "cuda") else 0
    if replicas < 1 or options.max_queue < 1:
        raise InvalidFormatError(f"replicas and max_queue must be >= 1, got {replicas} and {options.max_queue}")
    deployment = ZImageServer.options(
        num_replicas=replicas, ray_actor_options={"num_gpus": float(num_gpus), "num_cpus": num_cpus},
        # Past the queue bound requests must still reach the replica, which answers them 503 at once.
        max_ongoing_requests=options.max_queue + 16,
    )
    return deployment.bind(asdict(options))
