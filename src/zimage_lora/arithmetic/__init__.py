"""Adapter arithmetic: combine several adapters, resize one, extract one from two checkpoints.

Each returns an `Adapter` (apply it, or write it with `save` in any `convert` layout); its metadata
records the inputs, the method, the rank rule and the error.
"""

from __future__ import annotations

from .combine import combine
from .common import save
from .extract import extract
from .resize import resize

__all__ = ["combine", "extract", "resize", "save"]
