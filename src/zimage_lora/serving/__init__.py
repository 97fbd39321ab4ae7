"""Serving many users' adapters from one model: the Ray-free core (`core`) and the Ray Serve app
(`app`, needs the `[serve]` extra)."""

from .core import Engine, Job, ServeOptions, parse_job

__all__ = ["Engine", "Job", "ServeOptions", "parse_job"]
