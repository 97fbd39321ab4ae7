"""Per-block strengths in the engine: a caller's {pattern: number} mapping resolved against the model
and the adapter (`blocks.resolve`), and each module's number put where that module's slots and
merged rebuilds read it.

A record's `Strength` holds the default; a module whose number differs gets a child `Strength`
(`Strength.at`) that its slots read instead. Children are kept once made, so after the first
per-block change of an adapter every later one is an in-place fill of 0-d tensors: compiled graphs
see new values without recompiling, and switching costs one fill per differing module.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from ..adapter import Adapter, Target
from ..blocks import DEFAULT, TEXT_ENCODER_KEY, Blocks, check_patterns, default_of, is_blocks, model_names, resolve
from ..keys.index import named_modules
from .state import Record
from .validate import check_scale

if TYPE_CHECKING:
    from .layer import AdapterLinear

Strengthish = float | Blocks
# model -> (its module names, {(patterns, modules): resolved}); names are read once per model.
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[list[str], dict[Any, Any]]] = weakref.WeakKeyDictionary()
_MAX_RESOLVED = 64


def check_strength(value: Any, what: str = "scale") -> Any:
    """A caller's strength checked for shape: a number (returned as float) or a mapping (returned as
    given, checked; resolved once the model and adapter are known)."""
    if is_blocks(value):
        check_patterns(value, what)
        return value
    return check_scale(value, what)


def scaled(value: Any, factor: float) -> Any:
    """A checked strength times a number (a `LoRAConfiguration`'s own scale)."""
    if isinstance(value, Blocks):
        return value.scaled(factor)
    if is_blocks(value):
        return {p: v * factor for p, v in check_patterns(value)}
    return check_scale(value * factor)


def names_of(model: nn.Module) -> list[str]:
    entry = _CACHE.get(model)
    if entry is None:
        entry = _CACHE[model] = (model_names(named_modules(model)), {})
    return entry[0]


def resolve_for(model: nn.Module, adapter: Adapter, value: Any, what: str = "scale") -> Strengthish:
    """A checked strength as the engine keeps it: a float, or `Blocks` over `adapter`'s modules."""
    if not is_blocks(value):
        return check_scale(value, what)
    patterns = check_patterns(value, what)
    if isinstance(value, Blocks) and all(t.module in value.values for t in adapter.targets):
        return value
    names = names_of(model)
    cache = _CACHE[model][1]
    # Per adapter (its targets list, kept alive by the entry so that its id stays its own) and patterns.
    key = (patterns, id(adapter.targets), len(adapter.targets))
    hit = cache.get(key)
    if hit is None or hit[0] is not adapter.targets:
        modules = list(dict.fromkeys(t.module for t in adapter.targets))
        hit = (adapter.targets, resolve(dict(patterns), names, modules, what))
        if len(cache) >= _MAX_RESOLVED:
            cache.clear()
        cache[key] = hit
    return hit[1]


def for_part(model: nn.Module, adapter: Adapter, value: Any, transformer: bool, what: str = "scale") -> Strengthish:
    """A caller's strength for one component of a pipeline (`transformer`: that one, else the text
    encoder). A mapping's patterns name transformer modules, except its `text_encoder` key
    (`TEXT_ENCODER_KEY`): the text encoder's one number (as ComfyUI's separate model
    and clip strengths, or diffusers' per-component weights). Without that key the text encoder takes
    the mapping's default (`*`, else 1.0)."""
    if not is_blocks(value) or isinstance(value, Blocks):
        return resolve_for(model, adapter, value, what) if transformer else default_of(value)
    patterns = dict(check_patterns(value, what))
    text_encoder = patterns.pop(TEXT_ENCODER_KEY, None)
    if not transformer:
        return text_encoder if text_encoder is not None else (default_of(patterns) if patterns else DEFAULT)
    return resolve_for(model, adapter, patterns, what) if patterns else DEFAULT


def largest(value: Strengthish) -> float:
    """The largest magnitude a strength takes on any module (for the overflow headroom)."""
    if isinstance(value, Blocks):
        return max([abs(value.default), *map(abs, value.values.values())])
    return abs(value)


def set_strength(model: nn.Module, record: Record, value: Strengthish) -> None:
    """Set `record`'s strength; slots of modules that just got a number of their own read it from now on."""
    strength = record.strength
    before = len(strength.children)
    strength.set(value)
    if len(strength.children) != before:
        rebind(model, record)


def rebind(model: nn.Module, record: Record) -> None:
    """Point every slot of `record` at its module's Strength (a plain attribute: no module lookups)."""
    for module_name, keys in record.wrapped.items():
        wrapper = cast("AdapterLinear", model.get_submodule(module_name))
        want = record.strength.at(module_name)
        for k in keys:
            slot = wrapper.slots[k]
            if slot.__dict__.get("strength") is not want:
                vars(slot)["strength"] = want


def changed(targets: Iterable[Target], before: Strengthish, after: Strengthish) -> list[str]:
    """The modules of `targets` whose number differs between two strengths (what merged mode rebuilds)."""
    out = []
    for t in targets:
        a = before.at(t.module) if isinstance(before, Blocks) else before
        b = after.at(t.module) if isinstance(after, Blocks) else after
        if a != b:
            out.append(t.module)
    return list(dict.fromkeys(out))
