"""The shape rules of an adapter on a layer, in one place.

Three callers check them, each on what it has: the resolver on a file's header shapes before reading
any tensor (`keys.resolve`), the engine on a `Target` against the live module before changing it
(`apply.validate`), and the checkpoint merger on a `Target` against the checkpoint's own tensor
(`tools.checkpoint_merge`). Each passes a `where` prefix (file, key, module) for its messages.

DoRA magnitudes: PEFT stores one value per output row as `(out,)`; LyCORIS stores `(out, 1)` by
default and `(1, in)` when it decomposes per input column (`wd_on_out=False`). Nothing else fits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from . import algorithms
from .adapter import Target
from .algorithms.base import Algorithm
from .errors import IncompatibleWeightsError, LoRAError
from .placement import Placement

Shape = Sequence[int]
_ANOTHER_MODEL = "The adapter was made for another model (or another Z-Image variant), or the file is corrupt."


def check_rows(where: str, rows: tuple[int, int] | None, out_features: int) -> int:
    """The number of the module's output rows the delta lands on (all of them without `rows`)."""
    lo, hi = Placement.module_rows(rows, out_features)
    if not (0 <= lo < hi <= out_features):
        raise IncompatibleWeightsError(f"{where}: rows {lo}:{hi} fall outside the module's {out_features} output rows.")
    return hi - lo


def check_delta(
    where: str, algorithm: str, shapes: Mapping[str, Shape], *, out_rows: int, in_features: int,
    delta_rows: tuple[int, int] | None = None,
    inconsistent: tuple[type[LoRAError], str] = (IncompatibleWeightsError, ""),
    values: Mapping[str, Any] | None = None,
) -> int:
    """The delta the factors describe must take the module's inputs and cover its `out_rows` rows
    (rows `delta_rows` of it, when given). Returns the delta's row count. `inconsistent`: the error
    (and a sentence to add) for factors that describe no delta at all. `values`: the tensors, once
    read, for an algorithm whose fit depends on a value (`Algorithm.check_weight`)."""
    factors = {r: tuple(s) for r, s in shapes.items() if r not in ("diff_b", "dora")}
    try:
        if not factors:  # a bias-only diff: `check_bias` checks its length
            if "diff_b" in shapes and len(shapes["diff_b"]) != 1:
                raise ValueError(f"'diff_b' must be 1-D, found shape {list(shapes['diff_b'])}")
            return out_rows
        d_out, d_in = algorithms.delta_shape(algorithm, factors, like=(out_rows, in_features))
    except (ValueError, KeyError) as exc:
        error, tail = inconsistent
        raise error(f"{where}: inconsistent {algorithm} tensors: {exc}.{tail}") from None
    if delta_rows is not None and d_in == in_features:
        a, b = delta_rows
        if not (0 <= a < b <= d_out) or b - a != out_rows:
            raise IncompatibleWeightsError(
                f"{where}: delta rows {a}:{b} of a {d_out}-row delta cannot cover the module's {out_rows} rows."
            )
    elif d_in != in_features or d_out != out_rows:
        inputs = f" (it takes {d_in} inputs, the module has {in_features})" if d_in != in_features else ""
        raise IncompatibleWeightsError(
            f"{where}: the {algorithm} delta has shape {[d_out, d_in]} but the module expects "
            f"{[out_rows, in_features]}{inputs}. {_ANOTHER_MODEL}"
        )
    check = algorithms.get(algorithm).check_weight
    if check is not None:
        try:
            check(factors, (d_out, d_in), values)
        except ValueError as exc:
            raise IncompatibleWeightsError(
                f"{where}: the {algorithm} tensors do not fit the module's weight {[d_out, d_in]}: {exc}. "
                f"{_ANOTHER_MODEL}"
            ) from None
    return d_out


def check_row_groups(where: str, t: Target) -> None:
    """A target taking rows `delta_rows` of a larger delta (a fused file on split modules) must take
    whole row groups of an algorithm whose rows come in groups (`Algorithm.row_align`: OFT's blocks)."""
    algo = algorithms.get(t.algorithm)
    if t.delta_rows is None or algo.row_align is Algorithm.__dataclass_fields__["row_align"].default:
        return
    try:
        align = algo.row_align(algo.row_parts(t.tensors))
    except (ValueError, KeyError):
        return  # the tensors' own check says what is wrong
    a, b = t.delta_rows
    if a % align or b % align:
        raise IncompatibleWeightsError(
            f"{where}: rows {a}:{b} of the fused {t.algorithm} delta cut its groups of {align} rows, which only "
            "apply whole; apply the file to a model with the fused layer, or write it per module."
        )


def check_norm(where: str, algorithm: str, shapes: Mapping[str, Shape], weight_shape: Shape, *,
               rows: object = None, dora: object = None) -> None:
    """A norm layer (a 1-D weight, no Linear to wrap) takes only a full diff of its weight (and bias)."""
    diff = shapes.get("diff")
    if algorithm != "full" or diff is None or tuple(diff) != tuple(weight_shape) or rows or dora is not None:
        found = {r: list(s) for r, s in shapes.items()} | ({"dora": "magnitude"} if dora is not None else {})
        raise IncompatibleWeightsError(
            f"{where}: a norm layer takes only a full '.diff' of shape {list(weight_shape)}; found {algorithm} {found}."
        )


def check_bias(where: str, shape: Shape, *, has_bias: bool, want: int) -> None:
    if not has_bias:
        raise IncompatibleWeightsError(f"{where}: the adapter has a bias diff but the module has no bias.")
    if tuple(shape) != (want,):
        raise IncompatibleWeightsError(f"{where}: the bias diff has shape {list(shape)}, expected {[want]}.")


def dora_on_out(shape: Shape) -> bool:
    """Whether a DoRA magnitude of `shape` holds one value per output row (else: per input column)."""
    return not (len(shape) == 2 and shape[0] == 1 and shape[1] > 1)


def check_dora_shape(where: str, shape: Shape, *, out_rows: int, in_features: int) -> bool:
    """A magnitude as stored in a file: `(out,)`, `(out, 1)` or `(1, in)`. Returns `dora_on_out`."""
    if tuple(shape) not in ((out_rows,), (out_rows, 1), (1, in_features)):
        raise IncompatibleWeightsError(
            f"{where}: DoRA magnitude has {math.prod(shape)} values (shape {list(shape)}); expected {out_rows} "
            f"(one per output row: [{out_rows}] or [{out_rows}, 1]) or [1, {in_features}] (one per input column)."
        )
    return dora_on_out(shape)


def check_dora_values(where: str, n_values: int, on_out: bool, *, out_rows: int, in_features: int) -> None:
    """A resolved magnitude (`Dora`: flat, with its orientation) on a module's `out_rows` x `in_features`."""
    want = out_rows if on_out else in_features
    if n_values != want:
        per = "output row" if on_out else "input column"
        raise IncompatibleWeightsError(
            f"{where}: DoRA magnitude has {n_values} values, expected {want} (one per {per})."
        )


def check_target(where: str, t: Target, *, out_features: int, in_features: int, has_bias: bool) -> int:
    """Everything about one `Target`'s shapes on a Linear of `out_features` x `in_features`.
    Returns the number of module rows it lands on."""
    n = check_rows(where, t.rows, out_features)
    shapes = {r: tuple(v.shape) for r, v in t.tensors.items()}
    d_out = check_delta(where, t.algorithm, shapes, out_rows=n, in_features=in_features, delta_rows=t.delta_rows,
                        values=t.tensors)
    check_row_groups(where, t)
    if "diff_b" in shapes:
        check_bias(where, shapes["diff_b"], has_bias=has_bias, want=d_out if t.delta_rows is not None else n)
    if t.dora is not None:
        check_dora_values(where, t.dora.magnitude.numel(), t.dora.on_out, out_rows=n, in_features=in_features)
    return n


def check_norm_target(where: str, t: Target, weight_shape: Shape, *, has_bias: bool) -> None:
    """A `Target` on a norm layer: a full diff of its 1-D weight, and optionally its bias."""
    check_norm(where, t.algorithm, {r: tuple(v.shape) for r, v in t.tensors.items()}, weight_shape,
               rows=t.rows, dora=t.dora)
    if "diff_b" in t.tensors:
        check_bias(where, tuple(t.tensors["diff_b"].shape), has_bias=has_bias, want=weight_shape[0])
