"""`generate_batch(pipe, requests)`: many text-to-image requests, each with its own adapters, in as few
pipeline calls as their settings allow.

Requests that agree on steps, size and guidance run as one `ZImagePipeline` call: one generator per
request (seeded as `zimage-lora generate` seeds it) and per-sample adapters inside, so request i's
image equals the image of request i run alone with only its adapters active.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .apply.per_sample import per_sample_adapters
from .errors import InvalidFormatError


@dataclass(frozen=True)
class Request:
    """One image: the prompt, its seed and settings, and `adapters` = {attached name: strength}."""

    prompt: str
    seed: int = 0
    steps: int = 9
    width: int = 1024
    height: int = 1024
    guidance: float = 0.0
    adapters: Mapping[str, float] = field(default_factory=dict)
    negative_prompt: str | None = None

    def key(self) -> tuple[int, int, int, float]:
        """Requests with equal keys can share one pipeline call."""
        return (self.steps, self.width, self.height, float(self.guidance))


def check_request(r: Any) -> Request:
    """The request, validated: every problem a caller can cause is an `InvalidFormatError`."""
    if not isinstance(r, Request):
        raise InvalidFormatError(f"expected a zimage_lora.Request, got {type(r).__name__}")
    if not isinstance(r.prompt, str) or not r.prompt.strip():
        raise InvalidFormatError(f"prompt must be a non-empty string, got {r.prompt!r}")
    for name in ("seed", "steps", "width", "height"):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidFormatError(f"{name} must be an integer, got {value!r}")
    if not 0 <= r.seed < 2**63:
        raise InvalidFormatError(f"seed must be in [0, 2**63), got {r.seed}")
    if not 1 <= r.steps <= 1000:
        raise InvalidFormatError(f"steps must be in [1, 1000], got {r.steps}")
    if not (16 <= r.width <= 4096 and 16 <= r.height <= 4096):
        raise InvalidFormatError(f"width and height must be in [16, 4096], got {r.width}x{r.height}")
    if isinstance(r.guidance, bool) or not isinstance(r.guidance, int | float) or not math.isfinite(r.guidance):
        raise InvalidFormatError(f"guidance must be a finite number, got {r.guidance!r}")
    if not isinstance(r.adapters, Mapping):
        raise InvalidFormatError(f"adapters must map attached adapter names to strengths, got {r.adapters!r}")
    if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
        raise InvalidFormatError(f"negative_prompt must be a string, got {r.negative_prompt!r}")
    return r


def groups(requests: Sequence[Request], max_batch_size: int | None = None) -> list[list[int]]:
    """Indices of requests that run together: equal keys, in arrival order, at most `max_batch_size`."""
    by_key: dict[tuple, list[list[int]]] = {}
    for i, r in enumerate(requests):
        chunks = by_key.setdefault(r.key(), [[]])
        if max_batch_size is not None and len(chunks[-1]) >= max_batch_size:
            chunks.append([])
        chunks[-1].append(i)
    return [chunk for chunks in by_key.values() for chunk in chunks]


def generate_batch(
    pipe: Any,
    requests: Iterable[Request],
    *,
    max_batch_size: int | None = None,
    output_type: str = "pil",
) -> list[Any]:
    """One image per request, in order. Compatible requests (same steps, size, guidance) share a
    pipeline call with per-sample generators and per-sample adapters (`per_sample_adapters`)."""
    reqs = [check_request(r) for r in requests]
    if max_batch_size is not None and max_batch_size < 1:
        raise InvalidFormatError(f"max_batch_size must be >= 1, got {max_batch_size}")
    images: list[Any] = [None] * len(reqs)
    for idx in groups(reqs, max_batch_size):
        for i, image in zip(idx, run_group(pipe, [reqs[i] for i in idx], output_type), strict=True):
            images[i] = image
    return images


def run_group(pipe: Any, reqs: list[Request], output_type: str = "pil") -> list[Any]:
    """One pipeline call for requests that share a key."""
    first = reqs[0]
    # One CPU generator per request, seeded as `generate` seeds its single one: same noise per request.
    generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in reqs]
    kwargs: dict[str, Any] = dict(
        # Fresh lists: ZImagePipeline writes the chat-templated prompts back into the list it gets.
        prompt=[r.prompt for r in reqs],
        height=first.height,
        width=first.width,
        num_inference_steps=first.steps,
        guidance_scale=first.guidance,
        generator=generators,
        output_type=output_type,
    )
    if any(r.negative_prompt is not None for r in reqs):
        kwargs["negative_prompt"] = [r.negative_prompt or "" for r in reqs]  # "" is the pipeline's default
    pipe.set_progress_bar_config(disable=True)
    with per_sample_adapters(pipe, [dict(r.adapters) for r in reqs]):
        return list(pipe(**kwargs).images)
