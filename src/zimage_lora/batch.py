"""`generate_batch(pipe, requests)`: many text-to-image requests, each with its own adapters, in as few
pipeline calls as their settings allow.

Requests that agree on steps, size and guidance run as one `ZImagePipeline` call: one generator per
request (seeded as `zimage-lora generate` seeds it) and per-sample adapters inside, so request i's
image equals the image of request i run alone with only its adapters active.

A request's strengths may be per block (`{pattern: number}`, `zimage_lora.blocks`), follow a
schedule over the steps (`schedules`, `zimage_lora.scheduling`) and act only in a region of its
image (`regions`, `zimage_lora.apply.regional`): each request its own, in the same shared call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .apply.per_sample import per_sample_adapters
from .apply.regional_samples import per_sample_regions
from .errors import InvalidArgumentError, InvalidFormatError
from .mlx.probe import refuse
from .scheduling import Points, check_points
from .scheduling import schedule as scheduled

Strength = float | Mapping[str, float]  # a number, or per block {pattern: number}


@dataclass(frozen=True)
class Request:
    """One image: the prompt, its seed and settings, and `adapters` = {attached name: strength}.
    `schedules`: {attached name: (fraction, factor) points} multiplying that strength over the steps;
    `regions`: {attached name: box (x0, y0, x1, y1) in fractions, or a 2-D list of weights} where that
    adapter acts (caption tokens at the mask's mean)."""

    prompt: str
    seed: int = 0
    steps: int = 9
    width: int = 1024
    height: int = 1024
    guidance: float = 0.0
    adapters: Mapping[str, Strength] = field(default_factory=dict)
    negative_prompt: str | None = None
    schedules: Mapping[str, Points] = field(default_factory=dict)
    regions: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> tuple[int, int, int, float]:
        """Requests with equal keys can share one pipeline call."""
        return (self.steps, self.width, self.height, float(self.guidance))


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the one set of limits of `generate_batch` and of the server."""

    max_steps: int = 100
    max_side: int = 2048
    side_multiple: int = 16  # the VAE's 8x downsampling times the transformer's 2x2 patches
    max_prompt: int = 4000  # characters, for the prompt and the negative prompt
    max_strength: float = 1000.0  # |strength| of one adapter in one request
    max_adapters: int = 8  # adapters per request
    max_patterns: int = 32  # patterns of one per-block strength
    max_points: int = 16  # points of one schedule
    max_mask_side: int = 64  # rows and columns of a mask array (area-averaged onto the token grid anyway)


LIMITS = Limits()


def _plain(name: str) -> str:
    return name


def check_strength(value: Any, where: str, limits: Limits = LIMITS) -> float:
    """A per-request adapter strength: a finite number within +-max_strength (so it cannot overflow
    any float dtype the model runs in on its own; the engine refuses products that do)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidFormatError(f"{where} must be a finite number, got {value!r}")
    if abs(value) > limits.max_strength:
        raise InvalidFormatError(f"{where} must be within +-{limits.max_strength:g}, got {value:g}")
    return float(value)


def check_strength_spec(value: Any, where: str, limits: Limits = LIMITS) -> Strength:
    """A number (`check_strength`) or a per-block {pattern: number} mapping of such numbers. Only the
    shape is checked here; whether the patterns name blocks of the model is the model's to say
    (`blocks.resolve`)."""
    if not isinstance(value, Mapping):
        return check_strength(value, where, limits)
    if not value or len(value) > limits.max_patterns:
        raise InvalidFormatError(f"{where} must be a number or 1 to {limits.max_patterns} {{pattern: number}} "
                                 f"entries, got {len(value)} entries")
    out = {}
    for pattern, number in value.items():
        if not isinstance(pattern, str) or not pattern.strip() or len(pattern) > 200:
            raise InvalidFormatError(f"{where}: a pattern must be a non-empty string of at most 200 characters, "
                                     f"got {str(pattern)[:60]!r}")
        out[pattern] = check_strength(number, f"{where}[{pattern[:60]!r}]", limits)
    return out


def check_schedule(points: Any, where: str, limits: Limits = LIMITS) -> Points:
    """(fraction, factor) points: at most `max_points`, fractions increasing in [0, 1], factors within
    +-max_strength (they multiply a strength)."""
    if isinstance(points, list | tuple) and len(points) > limits.max_points:
        raise InvalidFormatError(f"{where} has {len(points)} points; at most {limits.max_points}")
    try:
        checked = check_points(points, where)
    except InvalidArgumentError as exc:  # a malformed request, not a misfit with the model
        raise InvalidFormatError(str(exc)) from None
    for _, factor in checked:
        check_strength(factor, f"{where}: a factor", limits)
    return checked


def check_region(mask: Any, where: str, limits: Limits = LIMITS) -> Any:
    """A box (x0, y0, x1, y1) in fractions of the image with x0 < x1 and y0 < y1 (a tuple), or a 2-D
    list of weights in [0, 1], at most `max_mask_side` a side (a list of lists)."""
    if isinstance(mask, list | tuple) and len(mask) == 4 and not any(isinstance(v, list | tuple) for v in mask):
        box = tuple(check_strength(v, f"{where}: a box edge", limits) for v in mask)
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise InvalidFormatError(f"{where}: a box is (x0, y0, x1, y1) in fractions of the image with "
                                     f"0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {box}")
        return box
    rows = mask if isinstance(mask, list | tuple) else None
    side = limits.max_mask_side
    if not rows or len(rows) > side or not all(isinstance(r, list | tuple) and 0 < len(r) <= side for r in rows) \
            or len({len(r) for r in rows}) != 1:
        raise InvalidFormatError(f"{where} must be a box [x0, y0, x1, y1] or a rectangular 2-D list of at most "
                                 f"{side}x{side} weights")
    out = []
    for r in rows:
        row = [check_strength(v, f"{where}: a weight", limits) for v in r]
        if any(not 0 <= v <= 1 for v in row):
            raise InvalidFormatError(f"{where}: mask weights must be in [0, 1], got {min(row):g}..{max(row):g}")
        out.append(row)
    return out


def _check_text(value: Any, name: str, limits: Limits, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > limits.max_prompt:
        shown = value if not isinstance(value, str) else value[:60]
        raise InvalidFormatError(
            f"{name} must be a {'non-empty ' if required else ''}string of at most {limits.max_prompt} characters,"
            f" got {shown!r}"
        )
    try:
        value.encode("utf-8")  # a lone surrogate cannot reach the tokenizer
    except UnicodeEncodeError as exc:
        raise InvalidFormatError(f"{name} is not valid Unicode text (a lone surrogate at {exc.start})") from None


def check_request(r: Any, limits: Limits = LIMITS, quote: Callable[[str], str] = _plain) -> Request:
    """The request, validated against `limits`: every problem a caller can cause is an
    `InvalidFormatError` naming the field (`quote` spells field names, e.g. as JSON keys)."""
    if not isinstance(r, Request):
        raise InvalidFormatError(f"expected a zimage_lora.Request, got {type(r).__name__}")
    _check_text(r.prompt, quote("prompt"), limits, required=True)
    _check_text(r.negative_prompt, quote("negative_prompt"), limits, required=False)
    for name, lo, hi in (("seed", 0, 2**63 - 1), ("steps", 1, limits.max_steps), ("width", 16, limits.max_side),
                         ("height", 16, limits.max_side)):
        value = getattr(r, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidFormatError(f"{quote(name)} must be an integer in [{lo}, {hi}], got {value!r}")
        if not lo <= value <= hi:
            raise InvalidFormatError(f"{quote(name)} must be in [{lo}, {hi}], got {value}")
    for name in ("width", "height"):
        if getattr(r, name) % limits.side_multiple:
            raise InvalidFormatError(
                f"{quote(name)} must be a multiple of {limits.side_multiple}, got {getattr(r, name)}"
            )
    if isinstance(r.guidance, bool) or not isinstance(r.guidance, int | float) or not math.isfinite(r.guidance):
        raise InvalidFormatError(f"{quote('guidance')} must be a finite number, got {r.guidance!r}")
    if not isinstance(r.adapters, Mapping):
        raise InvalidFormatError(f"adapters must map attached adapter names to strengths, got {r.adapters!r}")
    if len(r.adapters) > limits.max_adapters:
        raise InvalidFormatError(f"at most {limits.max_adapters} adapters per request, got {len(r.adapters)}")
    for name, strength in r.adapters.items():
        check_strength_spec(strength, f"the strength of {name!r}", limits)
    for what, extra in (("schedules", r.schedules), ("regions", r.regions)):
        if not isinstance(extra, Mapping) or set(extra) - set(r.adapters):
            raise InvalidFormatError(f"{what} must map adapters of the request ({sorted(r.adapters)}) to their "
                                     f"{what}, got {sorted(extra) if isinstance(extra, Mapping) else extra!r}")
    for name, points in r.schedules.items():
        check_schedule(points, f"the schedule of {name!r}", limits)
    for name, mask in r.regions.items():
        check_region(mask, f"the region of {name!r}", limits)
    return r


def groups(requests: Sequence[Request], max_batch_size: int | None = None) -> list[list[int]]:
    """Indices of requests that run together: equal keys, in arrival order, at most `max_batch_size`."""
    by_key: dict[tuple[int, int, int, float], list[list[int]]] = {}
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
    refuse(pipe, "generate_batch")
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
    specs = [dict(r.adapters) for r in reqs]
    block: Callable[[Any, Sequence[Mapping[str, Any]]], Any] = per_sample_adapters
    if any(r.regions for r in reqs):
        regions = [dict(r.regions) for r in reqs]

        def regional(model: Any, specs: Sequence[Mapping[str, Any]]) -> Any:
            return per_sample_regions(model, specs, regions)

        block = regional

    if any(r.schedules for r in reqs):  # reopens the block with each step's strengths
        context = scheduled(pipe, [dict(r.schedules) for r in reqs], specs=specs, block=block)
    else:
        context = block(pipe, specs)
    with context:
        return list(pipe(**kwargs).images)
