"""Strength over the denoising run: `with zl.schedule(pipe, {"style": [(0.0, 1.0), (0.6, 0.3)]}): pipe(...)`.

Each schedule is a list of (fraction of the run, factor) points; the factor multiplies the adapter's
strength as it is when the block opens (a number or a per-block strength, `zimage_lora.blocks`), so
`--lora f:0.8 --schedule "0:1,0.6:0.3"` runs at 0.8 first and ends at 0.24. Before the first point
the first factor holds, after the last the last one; between points the factor is linear in the
fraction (`interpolation="linear"`) or the earlier point's (`"step"`). Step i of n runs at fraction
i / n.

The strengths change between steps through the pipeline's own `callback_on_step_end` (the caller's
own callback still runs, first, and its tensors are kept): the first step's before the call starts,
step i + 1's at the end of step i. Only the transformer is re-weighted (the text encoder runs once,
before the first step, at its attached strength). In dynamic mode a change is an in-place fill of
the strengths the layers read (compiled graphs do not recompile); in merged mode each change is a
re-merge. On leaving the block every strength is put back as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import InvalidArgumentError, LoRAError

Points = tuple[tuple[float, float], ...]
INTERPOLATIONS = ("linear", "step")


def check_points(points: Any, where: str = "schedule") -> Points:
    """(fraction, factor) pairs: fractions in [0, 1], strictly increasing; finite factors."""
    if isinstance(points, (str, bytes, Mapping)) or not isinstance(points, Sequence) or not points:
        raise InvalidArgumentError(f"{where}: a schedule is a non-empty list of (fraction, factor) pairs, "
                                   f"e.g. [(0.0, 1.0), (0.6, 0.3)]; got {points!r}")
    out: list[tuple[float, float]] = []
    for p in points:
        try:
            f, v = (float(x) for x in p)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{where}: {p!r} is not a (fraction, factor) pair of numbers.") from None
        if not 0.0 <= f <= 1.0 or not math.isfinite(v) or abs(v) > 3.4e38:
            raise InvalidArgumentError(f"{where}: point {p!r}: the fraction must be in [0, 1] (of the denoising run) "
                                       "and the factor a finite number.")
        if out and f <= out[-1][0]:
            raise InvalidArgumentError(f"{where}: fractions must increase, got {out[-1][0]:g} then {f:g}.")
        out.append((f, v))
    return tuple(out)


def factor_at(points: Points, fraction: float, interpolation: str = "linear") -> float:
    """The schedule's factor at `fraction` of the run."""
    if fraction <= points[0][0]:
        return points[0][1]
    for (f0, v0), (f1, v1) in zip(points, points[1:], strict=False):
        if fraction < f1:
            if interpolation == "step":
                return v0
            return v0 + (v1 - v0) * (fraction - f0) / (f1 - f0)
    return points[-1][1]


def parse(text: str, where: str = "--schedule") -> Points:
    """`"0:1.0,0.6:0.3"` -> ((0.0, 1.0), (0.6, 0.3))."""
    pairs = []
    for item in text.split(","):
        f, sep, v = item.partition(":")
        if not sep:
            raise InvalidArgumentError(f"{where}: '{item}' is not FRACTION:FACTOR; write e.g. \"0:1.0,0.6:0.3\".")
        pairs.append((f.strip(), v.strip()))
    return check_points(pairs, where)


class _Run:
    """One open schedule: the base strengths it multiplies and how to set a fraction of the run."""

    def __init__(self, model: Any, schedules: dict[str, Points], interpolation: str) -> None:
        from .apply.access import attached

        self.model = model
        self.schedules = schedules
        self.interpolation = interpolation
        self.base: dict[str, Any] = {}
        for name in schedules:
            record = attached(model, name)
            if record is None:
                raise LoRAError(f"schedule: no adapter named '{name}' is attached to the transformer; apply it "
                                "first with apply_adapter(pipe, source, name=...).")
            self.base[name] = record.strength.get()
        self.last: dict[str, float] = {}

    def at(self, fraction: float) -> None:
        from .apply.engine import set_adapter_scale

        for name, points in self.schedules.items():
            factor = factor_at(points, fraction, self.interpolation)
            if self.last.get(name) == factor:
                continue  # nothing changed: no work (merged mode would re-merge)
            base = self.base[name]
            set_adapter_scale(self.model, name, base.scaled(factor) if hasattr(base, "scaled") else base * factor)
            self.last[name] = factor

    def restore(self) -> None:
        from .apply.engine import set_adapter_scale

        for name, base in self.base.items():
            if self.last.get(name, 1.0) != 1.0:
                set_adapter_scale(self.model, name, base)


def _wrapped_call(run: _Run, call: Any) -> Any:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807 - it is the pipeline's __call__
        user = kwargs.get("callback_on_step_end")
        if user is not None and hasattr(user, "tensor_inputs"):  # diffusers' PipelineCallback objects
            kwargs.setdefault("callback_on_step_end_tensor_inputs", user.tensor_inputs)

        def on_step(pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
            out = user(pipe, i, t, callback_kwargs) if user is not None else callback_kwargs
            n = getattr(pipe, "num_timesteps", None) or kwargs.get("num_inference_steps") or 1
            run.at((i + 1) / n)
            return out

        kwargs["callback_on_step_end"] = on_step
        run.at(0.0)
        return call(self, *args, **kwargs)

    return __call__


@contextmanager
def schedule(pipe: Any, schedules: Mapping[str, Any], *, interpolation: str = "linear") -> Iterator[None]:
    """Inside the block, each named adapter's strength follows its schedule over every denoising run
    of `pipe` (see the module doc). `schedules`: {adapter name: [(fraction, factor), ...]}."""
    from .apply.access import _model_of

    if interpolation not in INTERPOLATIONS:
        raise InvalidArgumentError(f"schedule: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if not isinstance(schedules, Mapping) or not schedules:
        raise InvalidArgumentError(f"schedule: expected {{adapter name: [(fraction, factor), ...]}}, got {schedules!r}")
    checked = {name: check_points(points, f"schedule of '{name}'") for name, points in schedules.items()}
    if not callable(pipe) or not hasattr(pipe, "transformer"):
        raise InvalidArgumentError(f"schedule: expected a Z-Image pipeline (with a transformer), got {type(pipe)}")
    run = _Run(_model_of(pipe), checked, interpolation)
    cls = type(pipe)
    # The pipeline's __call__ is looked up on its class: a subclass for this one object wraps it.
    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": _wrapped_call(run, cls.__call__),
                                                 "__module__": cls.__module__, "_zimage_lora_scheduled": cls})
    try:
        yield
    finally:
        pipe.__class__ = cls
        run.restore()
