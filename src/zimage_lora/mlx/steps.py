"""Schedules on mflux: `zl.schedule(model, {...})` with mflux's Z-Image, which has no diffusers
`callback_on_step_end` but a callback registry of its own (`model.callbacks`) that its denoising loop
calls before the loop and after each step. Inside the block one subscriber there sets each step's
strengths through the same schedule code as on PyTorch (`scheduling._Run`); leaving the block takes it
out and puts the strengths back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from ..errors import UnsupportedError


class Run(Protocol):
    def at(self, fraction: float) -> None: ...

    def restore(self) -> None: ...


class _Steps:
    """The subscriber: step t of n runs at fraction t / n (mflux numbers steps from its config's
    `init_time_step`, so an image-to-image run starts part way)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def call_before_loop(self, seed: int, prompt: str, latents: Any, config: Any, **_: Any) -> None:
        self.run.at(getattr(config, "init_time_step", 0) / max(1, int(config.num_inference_steps)))

    def call_in_loop(self, t: int, seed: int, prompt: str, latents: Any, config: Any, time_steps: Any) -> None:
        self.run.at((t + 1) / max(1, int(config.num_inference_steps)))


@contextmanager
def scheduled(pipe: Any, run: Run) -> Iterator[None]:
    registry: Any = getattr(pipe, "callbacks", None)
    if not hasattr(registry, "register") or not hasattr(registry, "in_loop"):
        raise UnsupportedError(
            "schedule is not supported on this MLX model: it needs mflux's model object (its `callbacks` "
            "registry runs the step hook). Pass mflux's ZImage, or call set_adapter_scale between steps.")
    steps = _Steps(run)
    registry.register(steps)
    try:
        yield
    finally:
        for subscribers in (registry.before_loop, registry.in_loop):
            if steps in subscribers:
                subscribers.remove(steps)
        run.restore()
