"""Request bodies to `Job`s: the JSON itself (size, depth, number sizes), then every field.

Everything a request carries is checked here, before it joins a batch, so a hostile body is a 400
of its own and never a 500 (or an error) of the batch it would have joined. The value limits are
`batch.LIMITS`, shared with `generate_batch`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from ..batch import LIMITS, Request, Strength, check_region, check_request, check_schedule, check_strength_spec
from ..errors import InvalidFormatError
from ..store_loader import check_source_name

MAX_BODY = 64 * 1024  # bytes
MAX_DEPTH = 8  # nesting of JSON arrays and objects; a /generate body needs 3
MAX_NUMBER_CHARS = 40  # an integer or a float literal (a 64-bit seed has 19 digits)

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


class BodyTooLargeError(InvalidFormatError):
    """The body is over MAX_BODY bytes (HTTP 413)."""


@dataclass(frozen=True)
class Job:
    """One request: the settings, its (source, strength) adapters, and the id its answers carry;
    `schedules` and `regions` by source (see `batch.Request`)."""

    request: Request
    loras: tuple[tuple[str, Strength], ...]
    request_id: str = ""
    schedules: tuple[tuple[str, Any], ...] = ()
    regions: tuple[tuple[str, Any], ...] = ()


def _number(kind: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > MAX_NUMBER_CHARS:  # Python refuses ints over 4300 digits with a ValueError
            raise InvalidFormatError(f"a number in the body has {len(text)} characters (at most {MAX_NUMBER_CHARS})")
        return kind(text)

    return parse


def _no_constant(name: str) -> Any:
    raise InvalidFormatError(f"{name} is not a JSON number; use finite numbers")


def load_json(raw: bytes) -> Any:
    """The body as JSON, within MAX_BODY bytes, MAX_DEPTH levels and MAX_NUMBER_CHARS per number."""
    if len(raw) > MAX_BODY:
        raise BodyTooLargeError(f"the body is larger than {MAX_BODY} bytes")
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub(b'""', raw)):  # counted before parsing: no recursion
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise InvalidFormatError(f"the body nests {deepest} levels of arrays or objects (at most {MAX_DEPTH})")
    try:
        return json.loads(raw, parse_int=_number(int), parse_float=_number(float), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidFormatError(f"the body is not JSON ({exc})") from None


def _quote(name: str) -> str:
    return f"'{name}'"


# What `loras` fills in; every other field of `Request` is a body field of the same name and default.
_FROM_LORAS = ("adapters", "schedules", "regions")
FIELDS = (*(f.name for f in fields(Request) if f.name not in _FROM_LORAS), "loras")
# The OpenAI route takes `size` for these two.
_SIZED = ("width", "height")


LORA_FIELDS = ("source", "strength", "schedule", "region")


Adapters = tuple[tuple[tuple[str, Strength], ...], tuple[tuple[str, Any], ...], tuple[tuple[str, Any], ...]]


def parse_loras(loras: Any, where: str = "loras") -> Adapters:
    """`[{"source": str, "strength": number or {pattern: number}, "schedule": [[fraction, factor], ...],
    "region": {"box": [x0, y0, x1, y1]} or {"mask": [[weight, ...], ...]}}, ...]` (only `source`
    required) -> (loras, schedules, regions) as a `Job` holds them."""
    if not isinstance(loras, list) or len(loras) > LIMITS.max_adapters:
        raise InvalidFormatError(
            f"'{where}' must be a list of at most {LIMITS.max_adapters} {{source, strength}} objects"
        )
    pairs, schedules, regions = [], [], []
    for i, item in enumerate(loras):
        if not isinstance(item, dict) or set(item) - set(LORA_FIELDS) or not isinstance(item.get("source"), str):
            shown = repr(item).encode("utf-8", "backslashreplace").decode()[:200]
            raise InvalidFormatError(f"{where}[{i}] must be an object with \"source\" (a string) and optionally "
                                     f"{list(LORA_FIELDS[1:])}, got {shown}")
        source = item["source"]
        check_source_name(source, f"{where}[{i}].source")
        pairs.append((source, check_strength_spec(item.get("strength", 1.0), f"{where}[{i}].strength")))
        if item.get("schedule") is not None:
            schedules.append((source, check_schedule(item["schedule"], f"{where}[{i}].schedule")))
        if item.get("region") is not None:
            regions.append((source, _region(item["region"], f"{where}[{i}].region")))
    sources = [s for s, _ in pairs]
    fine = {s for s, strength in pairs if not isinstance(strength, dict)} - {s for s, _ in schedules + regions}
    twice = sorted({s for s in sources if sources.count(s) > 1} - fine)
    if twice:  # two numbers add up (as attaching a file twice would); two schedules or regions do not
        raise InvalidFormatError(f"{where}: {twice} given twice with a per-block strength, a schedule or a region; "
                                 "give each source once")
    return tuple(pairs), tuple(schedules), tuple(regions)


def _region(value: Any, where: str) -> Any:
    if not isinstance(value, dict) or len(value) != 1 or not set(value) <= {"box", "mask"}:
        raise InvalidFormatError(f"{where} must be {{\"box\": [x0, y0, x1, y1]}} (fractions of the image) or "
                                 f"{{\"mask\": [[weight, ...], ...]}} (weights in [0, 1])")
    ((kind, mask),) = value.items()
    if kind == "box" and not (isinstance(mask, list) and len(mask) == 4):
        raise InvalidFormatError(f"{where}.box must be [x0, y0, x1, y1], got {str(mask)[:80]}")
    if kind == "mask" and isinstance(mask, list) and len(mask) == 4 and not isinstance(mask[0], list):
        raise InvalidFormatError(f"{where}.mask must be a 2-D list of weights, got {str(mask)[:80]}")
    return check_region(mask, f"{where}.{kind}")


def parse_job(body: Any, request_id: str = "") -> Job:
    """A `/generate` JSON body -> Job; every problem is an `InvalidFormatError` naming the field."""
    if not isinstance(body, dict):
        raise InvalidFormatError("the body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        shown = [k.encode("utf-8", "backslashreplace").decode()[:40] for k in unknown[:10]]
        raise InvalidFormatError(f"unknown fields {shown}; known: {sorted(FIELDS)}")
    prompt: Any = body.get("prompt")  # any JSON value: check_request says what is wrong with it
    request = Request(prompt, **{k: body[k] for k in FIELDS if k in body and k not in ("prompt", "loras")})
    check_request(request, quote=_quote)
    loras, schedules, regions = parse_loras(body.get("loras", []))
    return Job(replace(request, guidance=float(request.guidance)), loras, request_id, schedules, regions)


MAX_IMAGES = 8  # `n` of one OpenAI-style request
OPENAI_IGNORED = ("model", "quality", "style", "user", "background", "moderation", "output_format")


def _native() -> tuple[str, ...]:
    """/generate's fields the OpenAI route takes under the same names."""
    return tuple(k for k in FIELDS if k not in _SIZED)


def parse_openai(body: Any, request_id: str = "") -> list[Job]:
    """An OpenAI `POST /v1/images/generations` body -> one Job per image (seeds seed, seed+1, ...).
    `size` is "WIDTHxHEIGHT"; only `response_format` "b64_json" (images are never stored for URLs).
    Extension fields: `loras` as in /generate (with per-block strengths, schedules and regions),
    `seed`, `steps`, `guidance`, `negative_prompt`."""
    if not isinstance(body, dict):
        raise InvalidFormatError("the body must be a JSON object")
    known = {"n", "size", "response_format", *_native(), *OPENAI_IGNORED}
    unknown = sorted(set(body) - known)
    if unknown:
        shown = [k.encode("utf-8", "backslashreplace").decode()[:40] for k in unknown[:10]]
        raise InvalidFormatError(f"unknown fields {shown}; known: {sorted(known)}")
    n = body.get("n", 1) if body.get("n") is not None else 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
        raise InvalidFormatError(f"'n' must be an integer in [1, {MAX_IMAGES}], got {n!r}")
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise InvalidFormatError(f"'response_format' must be 'b64_json' (no image URLs are served), got {fmt!r}")
    size = body.get("size") or "1024x1024"
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", size) if isinstance(size, str) else None
    if match is None:
        raise InvalidFormatError(f"'size' must be 'WIDTHxHEIGHT', e.g. '1024x1024', got {size!r}")
    native = {k: body[k] for k in _native() if k in body}
    first = parse_job({**native, "width": int(match[1]), "height": int(match[2])}, request_id)
    r = first.request
    if r.seed + n - 1 >= 2**63:
        raise InvalidFormatError(f"'seed' + 'n' - 1 must be below 2**63, got {r.seed} + {n} - 1")
    return [replace(first, request=replace(r, seed=r.seed + i)) for i in range(n)]
