"""Per-block strengths: a strength given as a mapping from module patterns to numbers, resolved
against a model's module names into one number per module.

Patterns (dotted, matched against a module name or any dotted prefix of it, so `layers.3` covers
every Linear of block 3):

- a name or a prefix of one: `noise_refiner`, `cap_embedder`, `layers.3.attention.to_q`;
- a range of block indices: `layers.0-9`, `noise_refiner.0-1` (inclusive);
- `*` for any run of name parts: `*` (everything), `*.feed_forward.*`, `layers.*.attention`;
- a kind (`KINDS`): `attention`, `feed_forward`, `adaLN`, i.e. that part anywhere in the name;
- a preset (`PRESETS`): `early`, `middle`, `late`, thirds of the main `layers` stack.

The most specific pattern wins, blocks first: the one covering the fewest blocks of the model
(`block_of`), then the fewest leaf modules, then the later one in the mapping. So `layers.3` beats
`layers.0-9`, which beats `feed_forward` (every block's feed-forward), which beats `*`; and
`layers.0-9.feed_forward` beats `layers.0-9`. Modules no pattern covers keep `DEFAULT` (1.0): add
`"*": x` to change that. A pattern covering nothing is an error naming the nearest real patterns.
On a pipeline, the key `text_encoder` is the text encoder's one number (`apply.blockwise.for_part`).
Torch-free: the command line parses and the model resolves with the same code.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError
from .fp32 import fits_fp32

#: The strength of modules no pattern covers.
DEFAULT = 1.0
#: A mapping's key for a pipeline's text encoder: its one number (its modules are not patterns' business).
TEXT_ENCODER_KEY = "text_encoder"
#: Kind names: a pattern naming a kind covers every module with that part in its name.
KINDS = {"attention": "attention", "feed_forward": "feed_forward", "adaLN": "adaLN_modulation"}
#: Short names of Z-Image's embedders and final layer (the model's own names also work).
ALIASES = {"x_embedder": "all_x_embedder", "final_layer": "all_final_layer"}
#: Presets: (stack, first, last) fractions of that stack's blocks, [first, last).
PRESETS = {"early": ("layers", 0.0, 1 / 3), "middle": ("layers", 1 / 3, 2 / 3), "late": ("layers", 2 / 3, 1.0)}
#: Z-Image's stacks of transformer blocks (a block is `stack.index`); other top-level modules are one block each.
STACKS = ("noise_refiner", "context_refiner", "siglip_refiner", "layers")
RUN_ORDER = ("t_embedder", "all_x_embedder", "cap_embedder", "siglip_embedder", "noise_refiner", "context_refiner",
             "siglip_refiner", "layers", "all_final_layer")
# Parts of a model's module tree that are not its modules (the dynamic wrapper's internals).
_HIDDEN = re.compile(r"(^|\.)(base_layer|slots)(\.|$)")
_RANGE = re.compile(r"^(\d+)-(\d+)$")


@dataclass(frozen=True)
class Blocks:
    """A per-module strength resolved against one model: `values` for the modules asked about,
    `default` for every other module. `patterns` is what the caller gave (in order)."""

    patterns: tuple[tuple[str, float], ...]
    default: float
    values: Mapping[str, float] = field(default_factory=dict)

    def at(self, module: str) -> float:
        return self.values.get(module, self.default)

    def scaled(self, factor: float) -> Blocks:
        return Blocks(tuple((p, v * factor) for p, v in self.patterns), self.default * factor,
                      {m: v * factor for m, v in self.values.items()})

    def __str__(self) -> str:
        return ",".join(f"{p}={v:g}" for p, v in self.patterns)


def value_at(strength: float | Blocks, module: str) -> float:
    """A strength's number on one module (a plain number is the same everywhere)."""
    return strength.at(module) if isinstance(strength, Blocks) else strength


def default_of(strength: Any) -> float:
    """A strength's number on modules no pattern names (for a mapping not yet resolved: its '*')."""
    if isinstance(strength, Blocks):
        return strength.default
    if isinstance(strength, Mapping):
        star = [v for p, v in check_patterns(strength) if p == "*"]
        return star[-1] if star else DEFAULT
    return float(strength)


def is_blocks(value: Any) -> bool:
    """Whether a caller's strength is a per-block mapping (or an already resolved one)."""
    return isinstance(value, Mapping | Blocks)


def check_patterns(spec: Any, what: str = "strength") -> tuple[tuple[str, float], ...]:
    """A caller's mapping checked for shape: non-empty, string patterns, finite float32 numbers."""
    if isinstance(spec, Blocks):
        return spec.patterns
    if not isinstance(spec, Mapping) or not spec:
        raise InvalidArgumentError(f"{what} must be a number or a non-empty {{pattern: number}} mapping, got {spec!r}")
    out = []
    for pattern, value in spec.items():
        if not isinstance(pattern, str) or not pattern.strip():
            raise InvalidArgumentError(f"{what}: patterns must be non-empty strings, got {pattern!r}")
        number = None
        if not isinstance(value, (str, bytes, bool)):
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError):
                pass
        if number is None or not fits_fp32(number):
            raise InvalidArgumentError(
                f"{what}: pattern '{pattern}' must map to a finite number within float32's range, got {value!r}"
            )
        out.append((pattern.strip(), number))
    return tuple(out)


def model_names(named_modules: Iterable[tuple[str, Any]]) -> list[str]:
    """The module names patterns are matched against: a model's `named_modules()` without the root
    and without the dynamic wrapper's internals (a wrapped layer keeps its own name)."""
    return [n for n, _ in named_modules if n and not _HIDDEN.search(n)]


def resolve(spec: Any, names: list[str], modules: Iterable[str], what: str = "strength") -> Blocks:
    """`spec` (a {pattern: number} mapping) as one number per module in `modules`, the patterns
    matched against every name in `names` (the model's modules; see `model_names`)."""
    patterns = check_patterns(spec, what)
    stacks = _stacks(names)
    parents = {n.rpartition(".")[0] for n in names}
    leaves = [n for n in names if n not in parents]  # what "covers fewer modules" counts
    covered: list[tuple[int, int, int, float, re.Pattern[str]]] = []  # (blocks, leaves, -order, value, regex)
    for order, (pattern, value) in enumerate(patterns):
        regex = _compile(pattern, stacks, names, what)
        hits = [n for n in leaves if regex.match(n)]
        if not hits:
            raise _unknown(pattern, names, stacks, what)
        covered.append((len({block_of(n) for n in hits}), len(hits), -order, value, regex))
    covered.sort(key=lambda c: c[:3])  # the most specific first
    values = {}
    for module in dict.fromkeys(modules):
        values[module] = next((v for *_, v, rx in covered if rx.match(module)), DEFAULT)
    star = [v for (p, v) in patterns if p == "*"]
    default = star[-1] if star else DEFAULT
    return Blocks(patterns, default, values)


def _stacks(names: list[str]) -> dict[str, int]:
    """Indexed block stacks of the model (`layers`, `noise_refiner`, ...) and their block counts."""
    out: dict[str, int] = {}
    for n in names:
        head, _, rest = n.partition(".")
        index = rest.split(".", 1)[0]
        if index.isdigit():
            out[head] = max(out.get(head, 0), int(index) + 1)
    return out


def _compile(pattern: str, stacks: dict[str, int], names: list[str], what: str) -> re.Pattern[str]:
    if pattern in PRESETS:
        stack, lo, hi = PRESETS[pattern]
        n = stacks.get(stack, 0)
        first, last = math.floor(lo * n + 0.5), math.floor(hi * n + 0.5) - 1
        if n == 0 or last < first:
            raise InvalidArgumentError(f"{what}: preset '{pattern}' covers no block of this model's '{stack}' "
                                       f"({n} blocks).")
        pattern = f"{stack}.{first}-{last}"
    if pattern in KINDS:
        pattern = f"*.{KINDS[pattern]}"
    parts = pattern.split(".")
    parts[0] = ALIASES.get(parts[0], parts[0])
    out = []
    for i, part in enumerate(parts):
        m = _RANGE.match(part)
        if part == "*":
            out.append(r"[^.]+(?:\.[^.]+)*")
        elif m and int(m[1]) <= int(m[2]) and i > 0:
            lo, hi = int(m[1]), int(m[2])
            stack = ".".join(parts[:i])
            if stack in stacks and hi >= stacks[stack]:
                raise InvalidArgumentError(
                    f"{what}: pattern '{pattern}' reaches block {hi} but '{stack}' has blocks 0-{stacks[stack] - 1}."
                )
            out.append("(?:" + "|".join(str(k) for k in range(lo, hi + 1)) + ")")
        else:
            out.append("[^.]*".join(re.escape(s) for s in part.split("*")))
    return re.compile("^" + r"\.".join(out) + r"(?:\..*)?$")


def _unknown(pattern: str, names: list[str], stacks: dict[str, int], what: str) -> InvalidArgumentError:
    vocabulary = set(KINDS) | set(PRESETS) | set(ALIASES) | {"*"}
    for n in names:
        parts = n.split(".")
        vocabulary.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    vocabulary.update(f"{s}.0-{k - 1}" for s, k in stacks.items())
    near = difflib.get_close_matches(pattern, sorted(vocabulary), n=4, cutoff=0.5)
    tops = sorted({n.split(".")[0] for n in names})
    hint = f"nearest: {', '.join(near)}" if near else f"the model's top-level modules: {', '.join(tops)}"
    return InvalidArgumentError(
        f"{what}: pattern '{pattern}' matches no module of the model ({hint}). Patterns are module names or "
        f"prefixes, block ranges like 'layers.0-9', kinds {sorted(KINDS)}, presets {sorted(PRESETS)} or '*' globs."
    )


# -- the command line ----------------------------------------------------------------------------------
def parse(text: str, where: str = "--blocks") -> dict[str, float]:
    """`"layers.0-9=0.4,noise_refiner=0"`, or a path to a JSON file holding {pattern: number}."""
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidArgumentError(f"{where}: cannot read {text} as a JSON {{pattern: number}} object ({exc}).") \
                from exc
        return dict(check_patterns(data, f"{where} {text}"))
    out: dict[str, float] = {}
    for item in text.split(","):
        pattern, eq, value = item.rpartition("=")
        if not eq or not pattern.strip():
            raise InvalidArgumentError(
                f"{where}: '{item}' is not PATTERN=NUMBER; write e.g. \"layers.0-9=0.4,noise_refiner=0\" "
                "or the path of a JSON file."
            )
        try:
            out[pattern.strip()] = float(value)
        except ValueError:
            raise InvalidArgumentError(f"{where}: '{item}': '{value.strip()}' is not a number.") from None
    return dict(check_patterns(out, where))


def block_of(module: str) -> str:
    """The block a module belongs to: `layers.3`, `noise_refiner.0`, or the top-level module
    (`cap_embedder`, `t_embedder`) outside the stacks of transformer blocks (`STACKS`)."""
    parts = module.split(".")
    if parts[0] in STACKS and len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def block_key(block: str) -> tuple[int, str, int]:
    """Sort key of blocks in the order the model runs them: embedders, refiners, layers, final layer."""
    head, _, index = block.partition(".")
    order = RUN_ORDER.index(head) if head in RUN_ORDER else len(RUN_ORDER)
    return order, head, int(index) if index.isdigit() else -1
