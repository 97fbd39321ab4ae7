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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import InvalidArgumentError, LoRAError
from .mlx import dispatcher
from .mlx.probe import is_mlx, unsupported

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
        mlx = dispatcher(model)
        for name in schedules:
            record = attached(model, name) if mlx is None else None
            base = record.strength.get() if record is not None else mlx.strength_of(model, name) if mlx else None
            if base is None:
                raise LoRAError(f"schedule: no adapter named '{name}' is attached to the transformer; apply it "
                                "first with apply_adapter(pipe, source, name=...).")
            self.base[name] = base
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


def _scaled(strength: Any, factor: float) -> Any:
    if isinstance(strength, Mapping):
        return {p: v * factor for p, v in strength.items()}
    return strength.scaled(factor) if hasattr(strength, "scaled") else strength * factor


class _PerSampleRun:
    """A per-sample batch with a schedule per sample: each step's specs, as a per-sample block
    (`per_sample_adapters`) opened for the step's strengths (reopened only when a factor changed)."""

    def __init__(self, model: Any, schedules: list[dict[str, Points]], specs: Sequence[Mapping[str, Any]] | None,
                 interpolation: str, block: Callable[[Any, Sequence[Mapping[str, Any]]], Any] | None = None) -> None:
        if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence) or len(specs) != len(schedules):
            raise InvalidArgumentError(f"schedule: {len(schedules)} per-sample schedules need specs=[...] with one "
                                       f"{{adapter: strength}} per sample, got {specs!r}")
        for i, (sched, spec) in enumerate(zip(schedules, specs, strict=True)):
            missing = [n for n in sched if n not in spec]
            if missing:
                raise LoRAError(f"schedule: sample {i}'s schedule names {missing}, which its spec does not "
                                f"({sorted(spec)}); the schedule multiplies the spec's strength.")
        self.model, self.schedules, self.specs, self.interpolation = model, schedules, list(specs), interpolation
        self.open = block
        self.block: Any = None
        self.last: tuple[tuple[float, ...], ...] | None = None

    def at(self, fraction: float) -> None:
        from .apply.per_sample import per_sample_adapters

        factors = tuple(tuple(factor_at(p, fraction, self.interpolation) for p in s.values()) for s in self.schedules)
        if factors == self.last and self.block is not None:
            return
        at = self.interpolation
        specs = [{n: _scaled(v, factor_at(s[n], fraction, at)) if n in s else v for n, v in spec.items()}
                 for spec, s in zip(self.specs, self.schedules, strict=True)]
        block = (self.open or per_sample_adapters)(self.model, specs)
        self.restore()
        block.__enter__()
        self.block, self.last = block, factors

    def restore(self) -> None:
        if self.block is not None:
            block, self.block = self.block, None
            block.__exit__(None, None, None)


def _wrapped_call(run: _Run | _PerSampleRun, call: Any) -> Any:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807 - it is the pipeline's __call__
        user = kwargs.get("callback_on_step_end")
        if user is not None and hasattr(user, "tensor_inputs"):  # diffusers' PipelineCallback objects
            kwargs.setdefault("callback_on_step_end_tensor_inputs", user.tensor_inputs)

        def on_step(pipe: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            out = user(pipe, i, t, callback_kwargs) if user is not None else callback_kwargs
            n = getattr(pipe, "num_timesteps", None) or kwargs.get("num_inference_steps") or 1
            run.at((i + 1) / n)
            return out

        kwargs["callback_on_step_end"] = on_step
        run.at(0.0)
        try:
            return call(self, *args, **kwargs)
        finally:
            if isinstance(run, _PerSampleRun):
                run.restore()  # a per-sample block lasts one call

    return __call__


@contextmanager
def schedule(pipe: Any, schedules: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, interpolation: str = "linear",
             specs: Sequence[Mapping[str, Any]] | None = None,
             block: Callable[[Any, Sequence[Mapping[str, Any]]], Any] | None = None) -> Iterator[None]:
    """Inside the block, each named adapter's strength follows its schedule over every denoising run
    of `pipe` (see the module doc). `schedules`: {adapter name: [(fraction, factor), ...]}.

    Per-sample batches: `schedules` is a list with one such mapping per sample and `specs` the
    per-sample adapters (as for `per_sample_adapters`, which this opens for each call): sample i's
    strengths are `specs[i]`'s times its own schedule's factors. `block(model, specs)` opens the
    per-sample block (default `per_sample_adapters`; e.g. one with regions as well).
    """
    from .apply.access import _model_of

    if interpolation not in INTERPOLATIONS:
        raise InvalidArgumentError(f"schedule: interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    per_sample = isinstance(schedules, Sequence) and not isinstance(schedules, str)
    if not all(isinstance(s, Mapping) for s in (schedules if per_sample else [schedules])) or not schedules:
        raise InvalidArgumentError(f"schedule: expected {{adapter name: [(fraction, factor), ...]}} (or a list of "
                                   f"them, one per sample, with specs=...), got {schedules!r}")
    if is_mlx(pipe) or is_mlx(getattr(pipe, "transformer", None)):  # mflux: its own step hook (mlx.steps)
        from .mlx.steps import scheduled

        if not isinstance(schedules, Mapping):
            raise unsupported("per_sample_adapters")
        if specs is not None or block is not None:
            raise InvalidArgumentError("schedule: specs=... and block=... go with a list of per-sample schedules.")
        checked = {name: check_points(points, f"schedule of '{name}'") for name, points in schedules.items()}
        with scheduled(pipe, _Run(pipe, checked, interpolation)):
            yield
        return
    if not callable(pipe) or not hasattr(pipe, "transformer"):
        raise InvalidArgumentError(f"schedule: expected a Z-Image pipeline (with a transformer), got {type(pipe)}")
    run: _Run | _PerSampleRun
    if isinstance(schedules, Mapping):
        if specs is not None or block is not None:
            raise InvalidArgumentError("schedule: specs=... and block=... go with a list of per-sample schedules.")
        checked = {name: check_points(points, f"schedule of '{name}'") for name, points in schedules.items()}
        run = _Run(_model_of(pipe), checked, interpolation)
    else:
        checked_each = [{n: check_points(p, f"schedule of sample {i}, '{n}'") for n, p in s.items()}
                        for i, s in enumerate(schedules)]
        run = _PerSampleRun(_model_of(pipe), checked_each, specs, interpolation, block)
    cls = type(pipe)
    # The pipeline's __call__ is looked up on its class: a subclass for this one object wraps it.
    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": _wrapped_call(run, cls.__call__),
                                                 "__module__": cls.__module__, "_zimage_lora_scheduled": cls})
    try:
        yield
    finally:
        pipe.__class__ = cls
        run.restore()
