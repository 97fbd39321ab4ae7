"""The serving logic without Ray: options, request parsing, and one batch of requests to PNG bytes.

A batch may mix any adapter sets: the store leases every source the batch names, requests whose
adapters failed to load get their own error, and the rest run through `generate_batch` (per-sample
adapters; one pipeline call per distinct steps/size/guidance).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..batch import Request, generate_batch
from ..errors import AdapterNotFoundError, InvalidFormatError, LoRAError, UnsafeFileError
from ..store import AdapterStore

MAX_STEPS = 100
MAX_SIDE = 2048
MAX_LORAS = 8
MAX_PROMPT = 4000


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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ServeOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidFormatError(f"unknown serve options {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class Job:
    """One parsed `/generate` body: the request settings and its (source, strength) adapters."""

    request: Request
    loras: tuple[tuple[str, float], ...]


def http_status(exc: LoRAError) -> int:
    if isinstance(exc, UnsafeFileError):
        return 403
    if isinstance(exc, AdapterNotFoundError):
        return 404
    return 422 if not isinstance(exc, InvalidFormatError) else 400


def parse_job(body: Any) -> Job:
    """A `/generate` JSON body -> Job; every problem is an `InvalidFormatError` naming the field."""
    if not isinstance(body, dict):
        raise InvalidFormatError("the body must be a JSON object")
    known = {"prompt", "seed", "steps", "width", "height", "guidance", "loras", "negative_prompt"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidFormatError(f"unknown fields {unknown}; known: {sorted(known)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT:
        raise InvalidFormatError(f"'prompt' must be a non-empty string of at most {MAX_PROMPT} characters")
    ints = {}
    for name, default, lo, hi in (("seed", 0, 0, 2**63 - 1), ("steps", 9, 1, MAX_STEPS),
                                  ("width", 1024, 16, MAX_SIDE), ("height", 1024, 16, MAX_SIDE)):
        value = body.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise InvalidFormatError(f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}")
        ints[name] = value
    for name in ("width", "height"):
        if ints[name] % 16:
            raise InvalidFormatError(f"'{name}' must be a multiple of 16, got {ints[name]}")
    guidance = body.get("guidance", 0.0)
    if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
        raise InvalidFormatError(f"'guidance' must be a finite number, got {guidance!r}")
    negative = body.get("negative_prompt")
    if negative is not None and (not isinstance(negative, str) or len(negative) > MAX_PROMPT):
        raise InvalidFormatError("'negative_prompt' must be a string")
    loras = body.get("loras", [])
    if not isinstance(loras, list) or len(loras) > MAX_LORAS:
        raise InvalidFormatError(f"'loras' must be a list of at most {MAX_LORAS} {{source, strength}} objects")
    pairs = []
    for i, item in enumerate(loras):
        if not isinstance(item, dict) or set(item) - {"source", "strength"} or not isinstance(item.get("source"), str):
            raise InvalidFormatError(f"loras[{i}] must be {{\"source\": str, \"strength\": number}}, got {item!r}")
        strength = item.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise InvalidFormatError(f"loras[{i}].strength must be a finite number, got {strength!r}")
        pairs.append((item["source"], float(strength)))
    request = Request(prompt, guidance=float(guidance), negative_prompt=negative, **ints)
    return Job(request, tuple(pairs))


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
            pipeline = load_pipeline(options.model, DTYPES[options.dtype])
        self.pipe = pipeline.to(device)
        if options.quantize:
            quantize_transformer(self.pipe.transformer, options.quantize)
        roots = [str(Path(r).expanduser()) for r in options.roots]
        for root in roots:
            if not Path(root).is_dir():
                raise AdapterNotFoundError(f"{root}: adapter root is not a folder.")
        self.batches = 0  # batches run, and the largest seen: what GET /stats reports beside the store
        self.largest_batch = 0
        self.store = AdapterStore(
            self.pipe, host_budget_bytes=options.host_budget_bytes, device_budget_bytes=options.device_budget_bytes,
            roots=roots, allow_hub=options.allow_hub,
        )

    def run(self, jobs: list[Job]) -> list[bytes | LoRAError]:
        """PNG bytes per job, or the job's own error; one failing adapter fails only its requests."""
        results: list[bytes | LoRAError | None] = [None] * len(jobs)
        self.batches += 1
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
                requests.append(Request(r.prompt, r.seed, r.steps, r.width, r.height, r.guidance,
                                        lease.spec(job.loras), r.negative_prompt))
            images = generate_batch(self.pipe, requests, max_batch_size=self.options.max_batch_size)
        for i, image in zip(todo, images, strict=True):
            results[i] = png_bytes(image)
        return results  # type: ignore[return-value]


    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "largest_batch": self.largest_batch, "store": asdict(self.store.stats())}


def png_bytes(image: Any) -> bytes:
    """PNG bytes as `zimage-lora generate` writes them (PIL's `save` with format PNG)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
