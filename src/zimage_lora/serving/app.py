"""The Ray Serve application: `GET /health`, `POST /generate` (JSON in, PNG out).

Concurrent `/generate` requests are gathered by `@serve.batch` into one batch whatever their adapter
sets, and run as per-sample batches (`Engine.run`). Each request's adapters are loaded into the host
tier as soon as it arrives, so disk reads overlap the batch that is running.

On a cluster: `ray start` on every node, then `serve run zimage_lora.serving.app:build_app model=...`
or `serve deploy` of a config naming `import_path: zimage_lora.serving.app:build_app` (README).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response

from ..errors import InvalidFormatError, LoRAError
from .core import Engine, Job, ServeOptions, http_status, parse_job

MAX_BODY = 64 * 1024


def _error(exc: LoRAError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=http_status(exc))


@serve.deployment(max_ongoing_requests=64, health_check_period_s=10)
class ZImageServer:
    """One replica: a ZImagePipeline, its adapter store, and the batching queue in front of them."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = ServeOptions.from_dict(options)
        self.engine = Engine(self.options)
        self.generate_batched.set_max_batch_size(self.options.max_batch_size)
        self.generate_batched.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)

    async def __call__(self, request: HTTPRequest) -> Response:
        path = request.url.path.rstrip("/") or "/"
        if path == "/health":
            if request.method != "GET":
                return PlainTextResponse("use GET /health", status_code=405)
            return PlainTextResponse("ok")
        if path == "/stats" and request.method == "GET":
            return JSONResponse(self.engine.stats())
        if path != "/generate":
            return PlainTextResponse("not found: GET /health, GET /stats or POST /generate", status_code=404)
        if request.method != "POST":
            return PlainTextResponse("use POST /generate with a JSON body", status_code=405)
        raw = await request.body()
        try:
            if len(raw) > MAX_BODY:
                raise InvalidFormatError(f"the body is larger than {MAX_BODY} bytes")
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InvalidFormatError(f"the body is not JSON ({exc})") from None
            job = parse_job(body)
            # Read the adapters now (host tier), while the batch in flight computes; failures surface in the batch.
            await asyncio.to_thread(self.engine.store.lease([s for s, _ in job.loras]).close)
        except LoRAError as exc:
            return _error(exc)
        result = await self.generate_batched(job)
        if isinstance(result, LoRAError):
            return _error(result)
        return Response(result, media_type="image/png")

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batched(self, jobs: list[Job]) -> list[bytes | LoRAError]:
        try:
            # In a thread: the replica's event loop keeps answering health checks and queueing requests.
            return await asyncio.to_thread(self.engine.run, jobs)
        except LoRAError as exc:  # a failure of the whole batch (e.g. a bad size for the pipeline)
            return [exc] * len(jobs)

    def check_health(self) -> None:
        """Ray's replica health check: the engine was built (the constructor raises otherwise)."""
        if self.engine is None:
            raise RuntimeError("engine not ready")


def build_app(args: dict[str, Any]) -> Application:
    """The application builder for `serve run` / `serve deploy`: `args` are ServeOptions fields plus
    `replicas` (default 1), `num_gpus` per replica (default 1 when CUDA is visible, else 0) and
    `num_cpus` per replica (default 1)."""
    args = dict(args)
    replicas = int(args.pop("replicas", 1))
    num_gpus = args.pop("num_gpus", None)
    num_cpus = float(args.pop("num_cpus", 1))
    for key in ("host_budget_bytes", "device_budget_bytes", "max_batch_size"):
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
    if replicas < 1:
        raise InvalidFormatError(f"replicas must be >= 1, got {replicas}")
    deployment = ZImageServer.options(
        num_replicas=replicas, ray_actor_options={"num_gpus": float(num_gpus), "num_cpus": num_cpus},
    )
    return deployment.bind(asdict(options))
