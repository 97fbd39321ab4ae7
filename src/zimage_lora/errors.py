"""Typed errors. Every failure a user can cause is a `LoRAError`.

Messages follow one shape: what failed, where (file, key, module), what was expected and what was
found, and how to fix it. Subclasses let callers react to one kind of failure without parsing text.
"""

from __future__ import annotations


class LoRAError(Exception):
    """Base class of every error raised by zimage_lora."""


class AdapterNotFoundError(LoRAError, FileNotFoundError):
    """The source names no readable file, folder or hub repository."""


class InvalidFormatError(LoRAError, ValueError):
    """The file is not a valid adapter: bad header, unknown layout, missing partner tensor."""


class IncompatibleWeightsError(LoRAError, ValueError):
    """A key resolves to a real module but its shapes, dtype or values cannot be applied to it."""


class DownloadError(LoRAError):
    """Fetching from the Hugging Face Hub failed (offline, gated, missing file)."""


class AmbiguousSourceError(LoRAError, ValueError):
    """A folder or repository holds several candidate files and none was chosen."""


class UnsafeFileError(LoRAError):
    """The file would need unpickling or escapes its folder; it is refused, never executed."""


class InvalidArgumentError(LoRAError, ValueError):
    """A caller mistake in an argument: a scale that is not a finite number, an unknown mode, a
    compute dtype that is not a float type, mismatched names and weights, a hand-built `Adapter`
    without real tensors. Nothing was read and nothing changed."""


class InvalidValueError(InvalidArgumentError, InvalidFormatError):
    """An argument error that was raised as `InvalidFormatError` before `InvalidArgumentError`
    existed; it is both, so handlers written against the old type still catch it. Public by name
    because tracebacks show it."""


_LegacyArgumentError = InvalidValueError  # the name the library's modules import


class UnsupportedError(LoRAError, NotImplementedError):
    """A valid request this library (or this backend) cannot carry out, e.g. merging into GGUF K-quants."""


__all__ = [
    "LoRAError",
    "AdapterNotFoundError",
    "InvalidFormatError",
    "IncompatibleWeightsError",
    "InvalidArgumentError",
    "DownloadError",
    "AmbiguousSourceError",
    "UnsafeFileError",
    "UnsupportedError",
]
