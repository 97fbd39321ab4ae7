"""The Ray Serve application: an HTTP ingress in front of the model deployment (`replica`).

Routes: `GET /health`, `POST /generate` (JSON in, PNG out), the OpenAI-shaped
`POST /v1/images/generations`, `GET /stats` and `GET /metrics`. The ingress checks the API key, reads
and validates the body (nothing invalid reaches a batch), and calls a model replica with the
request's adapter set as the multiplexed model id, so Ray Serve routes it to a replica that already
holds those adapters (adapter affinity). Every answer carries Ray Serve's `X-Request-Id`; errors are
JSON `{"error", "request_id"}`.

On a cluster: `ray start` on every node, then `serve run zimage_lora.serving.app:build_app model=...`
or `serve deploy` of a config naming `import_path: zimage_lora.serving.app:build_app` (README).
"""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..errors import InvalidFormatError, LoRAError
from .auth import authorized, load_key_hashes
from .core import ServeOptions, http_status, log
from .metrics import RequestMetrics
from .parse import MAX_BODY, BodyTooLargeError, Job, load_json, parse_job, parse_openai
from .replica import ZImageServer, log_to_stderr, loopback_replica_server

RETRY_AFTER_S = 1
ROUTES = {"/stats": "GET", "/metrics": "GET", "/generate": "POST", "/v1/images/generations": "POST"}


class Answered(Exception):
    """A request that ends with this status and message (from the model replica)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(message: str, status: int, rid: str, openai: bool = False, **headers: str) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "request_id": rid}
    if openai:  # the shape OpenAI clients read their error message from
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body["error"] = {"message": message, "type": kind, "code": status}
    return JSONResponse(body, status_code=status, headers=headers or None)


def affinity_key(loras: tuple[tuple[str, Any], ...]) -> str:
    """The adapter set of a request, as the model id Ray routes by ("" without adapters: any replica)."""
    sources = sorted({source for source, _ in loras})
    return hashlib.sha256("\n".join(sources).encode("utf-8")).hexdigest()[:24] if sources else ""


@serve.deployment(max_ongoing_requests=1000, graceful_shutdown_timeout_s=60)
class ZImageIngress:
    """HTTP in front of the model replicas: keys, bodies, validation, affinity, status codes."""

    def __init__(self, server: DeploymentHandle[Any], options: dict[str, Any]) -> None:
        log_to_stderr()
        loopback_replica_server()
        self.server = server
        self.options = ServeOptions.from_dict(options)
        # Keys from the file (read on this node) or $ZIMAGE_LORA_API_KEYS: kept as hashes only.
        self.key_hashes = sorted({*self.options.api_key_hashes, *load_key_hashes(self.options.api_key_file)})
        self.metrics = RequestMetrics()
        self.inflight = 0  # HTTP requests being answered: what a drain waits on

    async def busy(self) -> tuple[str, int]:
        return serve.get_replica_context().replica_id.unique_id, self.inflight

    async def __call__(self, request: HTTPRequest) -> Response:
        # The proxy's request id: the one it returns in X-Request-Id and writes in Ray's own logs.
        rid = serve.context._get_serve_request_context().request_id or uuid.uuid4().hex
        path = request.url.path.rstrip("/") or "/"
        openai = path.startswith("/v1/")
        start = time.perf_counter()
        self.inflight += 1
        try:
            response = await self._route(request, path, rid)
        except LoRAError as exc:
            response = _error(str(exc), http_status(exc), rid, openai)
        except Answered as exc:
            retry = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 503 else {}
            response = _error(str(exc), exc.status, rid, openai, **retry)
        except Exception as exc:  # noqa: BLE001 - a bug: logged with the id, answered as JSON
            log.error("request %s failed", rid, exc_info=exc)
            response = _error(f"internal error ({type(exc).__name__}); request id {rid}", 500, rid, openai)
        finally:
            self.inflight -= 1
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
        if path not in ROUTES:
            return _error(f"not found: GET /health, {', '.join(f'{m} {p}' for p, m in ROUTES.items())}", 404, rid)
        if request.method != ROUTES[path]:
            return _error(f"use {ROUTES[path]} {path}", 405, rid)
        if path == "/stats":
            return JSONResponse(await self.server.stats.remote())
        if path == "/metrics":
            body = self.metrics.exposition() + await self.server.metrics_text.remote()
            return Response(body, media_type=RequestMetrics.content_type)
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
        """The jobs' PNGs from a model replica (one holding their adapters, when one is free)."""
        key = affinity_key(jobs[0].loras) if self.options.affinity else ""
        handle = self.server.options(multiplexed_model_id=key) if key else self.server
        outcomes: list[Any] = await handle.run.remote(jobs)
        for outcome in outcomes:
            if not isinstance(outcome, bytes):
                status, message = outcome
                if status == 503:
                    message += f"; retry after {RETRY_AFTER_S} s"
                raise Answered(status, message)
        return outcomes


def build_app(args: dict[str, Any]) -> Application:
    """The application builder for `serve run` / `serve deploy`: `args` are ServeOptions fields plus
    `replicas` (default 1), `num_gpus` per replica (default 1 when CUDA is visible, else 0) and
    `num_cpus` per replica (default 1). One ingress replica per model replica (no CPU reserved)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    num_gpus = args.pop("num_gpus", None)
    num_cpus = float(args.pop("num_cpus", 1))
    for key in ("host_budget_bytes", "device_budget_bytes", "max_batch_size", "max_queue"):
        if isinstance(args.get(key), str):
            args[key] = int(args[key])
    if isinstance(args.get("roots"), str):
        args["roots"] = [r for r in args["roots"].split(",") if r]
    for key in ("allow_hub", "affinity"):
        if isinstance(args.get(key), str):
            args[key] = args[key].lower() in ("1", "true", "yes")
    options = ServeOptions.from_dict(args)
    if num_gpus is None:
        import torch

        num_gpus = 1 if torch.cuda.is_available() and options.device in (None, "cuda") else 0
    if replicas < 1 or options.max_queue < 1:
        raise InvalidFormatError(f"replicas and max_queue must be >= 1, got {replicas} and {options.max_queue}")
    # serve.deployment made these classes Deployments (its decorator is untyped): typed loosely here.
    model_deployment: Any = ZImageServer
    ingress_deployment: Any = ZImageIngress
    server = model_deployment.options(
        num_replicas=replicas, ray_actor_options={"num_gpus": float(num_gpus), "num_cpus": num_cpus},
        # Past the queue bound calls must still reach the replica, which answers them 503 at once.
        max_ongoing_requests=options.max_queue + 16,
    ).bind(asdict(options))
    app: Application = ingress_deployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": 0}).bind(
        server, asdict(options))
    return app
