"""The serving logic without Ray: options, request parsing, and one batch of requests to PNG bytes.

A batch may mix any adapter sets: the store leases every source the batch names, requests whose
adapters failed to load get their own error, and the rest run through `generate_batch` (per-sample
adapters; one pipeline call per distinct steps/size/guidance). Requests are validated before they
join a batch (`parse`); if the batch still fails, each request is rerun alone, so only the requests
that cause a failure get it.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from ..batch import Request, generate_batch
from ..errors import AdapterNotFoundError, AmbiguousSourceError, InvalidFormatError, LoRAError, UnsafeFileError
from ..store import AdapterStore
from ..store_loader import OutsideRootsError, UnsafeFileTypeError
from .parse import BodyTooLargeError, Job, parse_job

__all__ = ["Engine", "InternalError", "Job", "ServeOptions", "http_status", "parse_job", "png_bytes"]

log = logging.getLogger("zimage_lora.serving")


@dataclass
class ServeOptions:
    """Everything a replica needs; plain values, so it crosses to Ray actors and YAML configs as is."""

    model: str
    dtype: str = "bf16"
    device: str | None = None
    quantize: str | None = None
    roots: list[str] = field(default_factory=list)  # adapter folders requests may read from
    allow_hub: bool = False  # also `org/name` ids, through the Hugging Face cache
    host_budget_bytes: int | None = 8 << 30
    device_budget_bytes: int | None = 4 << 30
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.05
    max_queue: int = 64  # requests a replica holds (queued + running); more answer 503 with Retry-After
    api_key_hashes: list[str] = field(default_factory=list)  # SHA-256 hex of accepted keys (no keys: open)
    api_key_file: str | None = None  # more keys, one a line, read by each replica on its node
    affinity: bool = True  # route requests for one adapter set to the replicas that hold it

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidFormatError(f"unknown serve options {unknown}; known: {sorted(known)}")
        return cls(**values)


class InternalError(Exception):
    """An unexpected failure of one request (a bug, not the caller's doing): HTTP 500 with the
    request id; the traceback goes to the server's log."""

    def __init__(self, request_id: str, exc: BaseException) -> None:
        super().__init__(f"internal error ({type(exc).__name__}); request id {request_id}")
        self.request_id = request_id
        self.exc = exc


def http_status(exc: BaseException) -> int:
    """The one status table (README "Status codes")."""
    if isinstance(exc, InternalError) or not isinstance(exc, LoRAError):
        return 500
    if isinstance(exc, BodyTooLargeError):
        return 413
    if isinstance(exc, OutsideRootsError):
        return 403
    if isinstance(exc, UnsafeFileTypeError):
        return 415
    if isinstance(exc, UnsafeFileError):
        return 403
    if isinstance(exc, AdapterNotFoundError):
        return 404
    return 400 if isinstance(exc, InvalidFormatError | AmbiguousSourceError) else 422


class Engine:
    """One replica's pipeline and adapter store."""

    def __init__(self, options: ServeOptions, pipeline: Any = None) -> None:
        import torch

        from ..tools.generate import DTYPES, load_pipeline, quantize_transformer

        self.options = options
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if pipeline is None:
            if options.dtype not in DTYPES:
                raise InvalidFormatError(f"dtype must be one of {sorted(DTYPES)}, got {options.dtype!r}")
            pipeline = load_pipeline(options.model, DTYPES[options.dtype], progress=False)
        self.pipe = pipeline.to(device)
        if options.quantize:
            quantize_transformer(self.pipe.transformer, options.quantize)
        roots = [str(Path(r).expanduser()) for r in options.roots]
        for root in roots:
            if not Path(root).is_dir():
                raise AdapterNotFoundError(f"{root}: adapter root is not a folder.")
        self.batches = 0  # batches run, and the largest seen: what GET /stats reports beside the store
        self.largest_batch = 0
        self.retried_batches = 0  # batches that failed as a whole and were rerun one request at a time
        self.requests = 0  # requests (images) that reached a batch
        self.store = AdapterStore(
            self.pipe, host_budget_bytes=options.host_budget_bytes, device_budget_bytes=options.device_budget_bytes,
            roots=roots, allow_hub=options.allow_hub,
        )

    def run(self, jobs: list[Job]) -> list[bytes | LoRAError | InternalError]:
        """PNG bytes per job, or the job's own error; a failure fails only the requests that cause it."""
        results: list[bytes | LoRAError | InternalError | None] = [None] * len(jobs)
        self.batches += 1
        self.requests += len(jobs)
        self.largest_batch = max(self.largest_batch, len(jobs))
        lease = self.store.lease(source for job in jobs for source, _ in job.loras)
        with lease:
            todo: list[int] = []
            requests: list[Request] = []
            for i, job in enumerate(jobs):
                error = lease.failure(s for s, _ in job.loras)
                if error is not None:
                    results[i] = error
                    continue
                todo.append(i)
                r = job.request
                name = lease.name
                # The parsed request with its sources swapped for attached names; every other field as sent.
                requests.append(replace(
                    r, adapters=lease.spec(job.loras), schedules={name(s): points for s, points in job.schedules},
                    regions={name(s): mask for s, mask in job.regions},
                ))
            try:
                images = generate_batch(self.pipe, requests, max_batch_size=self.options.max_batch_size)
                outcomes: list[Any] = [png_bytes(image) for image in images]
            except Exception:  # noqa: BLE001 - someone in the batch caused it: run each request alone to find out who
                self.retried_batches += 1
                outcomes = [self._alone(jobs[i].request_id, request) for i, request in zip(todo, requests, strict=True)]
        for i, outcome in zip(todo, outcomes, strict=True):
            results[i] = outcome
        return cast("list[bytes | LoRAError | InternalError]", results)  # every slot is filled above

    def check(self, job: Job) -> None:
        """What only the model can tell about a request, before it joins a batch: its per-block
        strengths' patterns name modules of the model (else a `LoRAError` naming the nearest ones)."""
        from ..apply.blockwise import names_of
        from ..blocks import resolve

        for i, (_, strength) in enumerate(job.loras):
            if isinstance(strength, dict):
                resolve(strength, names_of(self.store.model), [], f"loras[{i}].strength")

    def _alone(self, request_id: str, request: Request) -> bytes | LoRAError | InternalError:
        try:
            return png_bytes(generate_batch(self.pipe, [request])[0])
        except LoRAError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - not the caller's doing: a 500 of this request only
            log.error("request %s failed", request_id, exc_info=exc)
            return InternalError(request_id, exc)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests, "largest_batch": self.largest_batch,
                "retried_batches": self.retried_batches, "store": asdict(self.store.stats())}


def png_bytes(image: Any) -> bytes:
    """PNG bytes as `zimage-lora generate` writes them (PIL's `save` with format PNG)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
