"""Where `AdapterStore`'s adapters come from and how they reach the device.

- The source policy: a source's cache key (its real path, or a hub id) and the allow-list (local
  sources only inside the allowed roots, symlinks followed; hub ids only when allowed; names the
  OS cannot take and pickle-based files refused before anything is opened).
- Loading into host memory: page-locked on CUDA, so the upload can be an asynchronous copy.
- The upload itself: `non_blocking` copies on a side stream, with an event the attach waits for.
The store (cache tiers, pins, leases) is in `store`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import Adapter, Dora
from .errors import AdapterNotFoundError, AmbiguousSourceError, InvalidFormatError, LoRAError, UnsafeFileError
from .loading import load_adapter
from .sources import _HUB_ID, PICKLE_SUFFIXES, resolve_source

MAX_SOURCE_BYTES = 1024  # a whole source name, UTF-8
MAX_PART_BYTES = 255  # one path component (NAME_MAX on Linux and macOS)


class OutsideRootsError(UnsafeFileError):
    """The source resolves outside the allowed adapter folders (HTTP 403)."""


class UnsafeFileTypeError(UnsafeFileError):
    """The source is a pickle-based file, never opened (HTTP 415)."""


def _shown(text: str) -> str:
    """`text` as it may appear in a message (lone surrogates escaped, long names cut)."""
    shown = text.encode("utf-8", "backslashreplace").decode()
    return shown if len(shown) <= 120 else shown[:117] + "..."


def check_source_name(text: Any, where: str = "source") -> str:
    """A source name a request may send: non-empty UTF-8 text without NUL, at most MAX_SOURCE_BYTES,
    each path component at most MAX_PART_BYTES (longer names fail in the OS, not here)."""
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidFormatError(f"{where}: {_shown(str(text))!r} is not an adapter source name.")
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidFormatError(f"{where}: {_shown(text)!r} is not valid Unicode text (a lone surrogate).") from None
    longest = max(len(part.encode("utf-8")) for part in text.split("/"))
    if len(data) > MAX_SOURCE_BYTES or longest > MAX_PART_BYTES:
        raise InvalidFormatError(
            f"{where}: {_shown(text)!r} is too long ({len(data)} bytes, longest part {longest}); at most "
            f"{MAX_SOURCE_BYTES} bytes and {MAX_PART_BYTES} per folder or file name."
        )
    return text


def source_key(source: str | Path, roots: Sequence[Path] | None, allow_hub: bool) -> str:
    """The cache key of `source`: its real path, or the hub id. Refuses what the policy forbids."""
    text = check_source_name(str(source))
    try:
        return _source_key(text, roots, allow_hub)
    except OSError as exc:  # the OS refused the name itself (e.g. a component too long for this file system)
        raise AdapterNotFoundError(f"{_shown(text)}: cannot be looked up ({exc.strerror or exc}).") from None


def _source_key(text: str, roots: Sequence[Path] | None, allow_hub: bool) -> str:
    if roots is None:
        path = Path(text).expanduser()
        if path.exists():
            return os.path.realpath(path)
        if not allow_hub:
            raise AdapterNotFoundError(f"{text}: no such file or folder (Hugging Face ids are not allowed here).")
        return text
    candidates = [Path(text)] if Path(text).is_absolute() else [root / text for root in roots]
    for path in candidates:
        if path.exists():
            real = Path(os.path.realpath(path))
            _check_inside(real, roots, text)
            # A folder picks its file itself (maybe through a symlink): that file must be inside too.
            _check_inside(_picked(real, text), roots, text)
            return str(real)
    hub_like = _HUB_ID.match(text) and not text.endswith(".safetensors")
    if allow_hub and hub_like:
        return text
    if Path(text).is_absolute() or ".." in Path(text).parts:
        raise OutsideRootsError(f"{_shown(text)}: outside the allowed adapter folders; adapters are read only there.")
    hint = ""
    if allow_hub:
        hint = " and not a Hugging Face id 'org/name'"
    elif hub_like:
        hint = "; Hugging Face ids are accepted only when the server allows them (--allow-hub, allow_hub: true)"
    raise AdapterNotFoundError(f"{_shown(text)}: no such adapter under the allowed folders{hint}.")


def _picked(real: Path, text: str) -> Path:
    """The file that `real` (a file, or a folder holding one adapter) is read from; pickles refused."""
    try:
        picked = Path(os.path.realpath(resolve_source(real).path))
    except AmbiguousSourceError:
        files = sorted(str(p.relative_to(real)) for p in real.rglob("*.safetensors"))[:20]
        raise AmbiguousSourceError(
            f"{_shown(text)}: a folder with several adapter files ({', '.join(files)}); name one of them, e.g. "
            f"'{_shown(text).rstrip('/')}/{files[0] if files else 'file.safetensors'}'."
        ) from None
    except UnsafeFileError as exc:  # a pickle-based file (or a folder holding only those)
        raise UnsafeFileTypeError(str(exc)) from None
    if picked.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeFileTypeError(
            f"{_shown(text)}: '{picked.suffix}' files are pickle-based and can run code when loaded; they are "
            "never opened. Ask for the .safetensors version of the adapter."
        )
    return picked


def _check_inside(real: Path, roots: Sequence[Path], text: str) -> None:
    if not any(real == root or root in real.parents for root in roots):
        raise OutsideRootsError(f"{_shown(text)}: outside the allowed adapter folders; adapters are read only there.")


def load_host(key: str, model: nn.Module, *, pin: bool) -> Adapter:
    """The adapter at `key`, loaded for `model`; any load failure is a `LoRAError` naming the key."""
    try:
        adapter = load_adapter(key, model)
    except LoRAError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:
        raise LoRAError(f"{key}: failed to load the adapter ({exc}).") from None
    if pin:  # page-locked, so the upload can be an asynchronous copy
        adapter = map_tensors(adapter, lambda t: t.pin_memory())
    return adapter


def stage_upload(adapter: Adapter, device: torch.device, stream: Any) -> tuple[Adapter, Any]:
    """Start copying `adapter` to `device` on `stream` (it overlaps a running batch): (the device
    copy, the event that marks the copy done)."""
    with torch.cuda.stream(stream):
        copy = map_tensors(adapter, lambda t: t.to(device, non_blocking=True))
        done = torch.cuda.Event()
        done.record(stream)
    return copy, done


def map_tensors(adapter: Adapter, fn: Any) -> Adapter:
    """A copy of `adapter` with `fn` applied to every tensor (the targets are copied, not shared)."""
    targets = []
    for t in adapter.targets:
        dora = None if t.dora is None else Dora(fn(t.dora.magnitude), t.dora.on_out)
        targets.append(replace(t, tensors={k: fn(v) for k, v in t.tensors.items()}, dora=dora))
    return replace(adapter, targets=targets)
