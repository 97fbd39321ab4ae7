"""Parsing text that comes from files: JSON documents and the regular expressions inside them.

Adapter configs, safetensors metadata, shard indexes and model configs are written by strangers. The
standard parsers raise `RecursionError` on deep nesting, `ValueError` on integers of more than 4,300
digits, and the `regex` compiler recurses once per nested group: every such escape becomes an
`InvalidFormatError` naming the file, and the limits are checked before the parser runs, so they hold
whatever recursion limit the host program has set.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidFormatError

if TYPE_CHECKING:
    import regex

# No adapter config, index or model config nests deeper than ~5 or needs an integer beyond 2**64.
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40
MAX_JSON_FILE_BYTES = 16 * 1024 * 1024  # config.json / index / adapter_config.json on disk
MAX_PATTERN_CHARS = 1000
PRESCAN_ALWAYS_CHARS = 1024 * 1024
MAX_PATTERN_DEPTH = 50

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: one pass, no backtracking
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LONG_DIGITS = re.compile(rf"[0-9]{{{MAX_INT_DIGITS + 1},}}")


def json_problem(text: str, *, max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why `text` must not reach `json.loads` (too deep, integer too long), or None.

    Strings are blanked first so brackets and digits inside them do not count; linear time.
    """
    bare = _STRING.sub('""', text)
    long_number = _LONG_DIGITS.search(bare)
    if long_number:
        n = len(long_number.group())
        return f"a number of {n} digits; at most {MAX_INT_DIGITS} are accepted"
    brackets = _NOT_BRACKET.sub("", bare)
    if len(brackets) > max_depth:
        depth = max(itertools.accumulate((1 if c in "[{" else -1 for c in brackets), initial=0))
        if depth > max_depth:
            return f"nested {depth} deep; at most {max_depth} levels are accepted"
    return None


def _needs_prescan(text: str) -> bool:
    """Small documents always; a large one (a safetensors header of 200,000 keys, where the scan would
    add a third to the parse) only when the host has relaxed the interpreter's own guards. With them in
    force, the C parser stops deep nesting with `RecursionError` and long integers with `ValueError`,
    both caught below, and the header's own structure checks do the rest."""
    if len(text) <= PRESCAN_ALWAYS_CHARS:
        return True
    digits = sys.get_int_max_str_digits()
    return sys.getrecursionlimit() > 10_000 or digits == 0 or digits > 4300


def parse_json(
    data: bytes | str,
    source: object,
    *,
    what: str = "the JSON",
    fix: str = "Fix or re-create the file.",
    max_depth: int = MAX_JSON_DEPTH,
) -> object:
    """`json.loads` for untrusted text: any failure is an `InvalidFormatError` that names `source`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as exc:
        raise InvalidFormatError(f"{source}: {what} is not valid JSON ({exc}). {fix}") from None
    problem = json_problem(text, max_depth=max_depth) if _needs_prescan(text) else None
    if problem is None:
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            problem = str(exc)[:200]
    raise InvalidFormatError(f"{source}: {what} is not valid JSON ({problem}). {fix}")


def read_json_file(path: Path, *, what: str = "the file", fix: str = "Fix or re-create the file.") -> object:
    """Read and parse a small JSON file (config, index); unreadable, huge or bad JSON -> `InvalidFormatError`."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_FILE_BYTES:
            raise InvalidFormatError(
                f"{path}: {size} bytes, more than the {MAX_JSON_FILE_BYTES} accepted for {what}. {fix}"
            )
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc
        raise InvalidFormatError(f"{path}: cannot read {what} ({reason}). Check the permissions.") from None
    return parse_json(data, path, what=what, fix=fix)


def compile_pattern(pattern: str, source: object, *, field: str = "alpha_pattern") -> regex.Pattern[str]:
    """A regular expression from a file, compiled on the `regex` engine (matching takes a timeout).

    Length and group nesting are bounded first: `regex` compiles recursively, and 5,000 nested groups
    exhaust the interpreter's stack.
    """
    if not isinstance(pattern, str):
        raise InvalidFormatError(f"{source}: pattern {pattern!r} in '{field}' is not a string. Fix '{field}'.")
    return _compile(pattern, str(source), field)


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, source: str, field: str) -> regex.Pattern[str]:
    import regex

    def refuse(reason: str) -> InvalidFormatError:
        return InvalidFormatError(
            f"{source}: pattern {_short(pattern)} cannot be used ({reason}). Fix '{field}' in the config."
        )

    bare = pattern.replace("\\\\", "").replace("\\(", "").replace("\\)", "")
    depth = max(itertools.accumulate(((c == "(") - (c == ")") for c in bare), initial=0))
    if depth > MAX_PATTERN_DEPTH:
        raise refuse(f"groups nested {depth} deep; at most {MAX_PATTERN_DEPTH} are accepted")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise refuse(f"{len(pattern)} characters; at most {MAX_PATTERN_CHARS} are accepted")
    try:
        return regex.compile(rf"(.*\.)?({pattern})$")
    except (regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise refuse(str(exc)[:200]) from None


def _short(pattern: str) -> str:
    return repr(pattern) if len(pattern) <= 40 else f"{pattern[:20]!r}...{pattern[-12:]!r} ({len(pattern)} characters)"


_LITERAL_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]+$")


def pattern_value(patterns: object, stem: str, source: object = "adapter config") -> object:
    r"""PEFT's rank/alpha pattern lookup (peft.utils.other.get_pattern_key): the first pattern, in the
    config's order, that matches the module name as `(.*\.)?(pattern)$`.

    Patterns come from the file, so they are untrusted: plain names are matched without a regex, real
    regular expressions run on the `regex` engine (a diffusers dependency) with a time limit, since a
    pattern like '(.*)*(.*)*Z' would freeze Python's `re` for hours.
    """
    if not isinstance(patterns, dict):
        kind = type(patterns).__name__
        raise InvalidFormatError(f"{source}: alpha/rank pattern must be a JSON object, found {kind}.")
    for pattern, value in patterns.items():
        if _LITERAL_PATTERN.match(pattern):
            if _literal_match(pattern, stem):
                return value
            continue
        compiled = compile_pattern(pattern, source)
        try:
            if compiled.match(stem, timeout=1.0):
                return value
        except (TimeoutError, RecursionError) as exc:
            raise InvalidFormatError(
                f"{source}: pattern {pattern[:100]!r} cannot be used ({exc}). Fix 'alpha_pattern' in the config."
            ) from None
    return None


def _literal_match(pattern: str, stem: str) -> bool:
    r"""PEFT's `(.*\.)?(pattern)$` (peft.utils.other.get_pattern_key) for a pattern without regex
    syntax but '.', which there matches any one character ('attention.to.v' matches 'to_v'): the
    last len(pattern) characters match it, at the start or right after a '.'."""
    n = len(pattern)
    if len(stem) < n or (len(stem) > n and stem[-n - 1] != "."):
        return False
    return all(p == "." or p == c for p, c in zip(pattern, stem[-n:], strict=True))
