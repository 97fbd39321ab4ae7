"""Where `AdapterStore`'s adapters come from and how they reach the device.

- The source policy: a source's cache key (its real path, or a hub id) and the allow-list (local
  sources only inside the allowed roots, symlinks followed; hub ids only when allowed).
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
from .errors import AdapterNotFoundError, LoRAError, UnsafeFileError
from .loading import load_adapter
from .sources import _HUB_ID, resolve_source


def source_key(source: str | Path, roots: Sequence[Path] | None, allow_hub: bool) -> str:
    """The cache key of `source`: its real path, or the hub id. Refuses what the policy forbids."""
    text = str(source)
    if not text or "\x00" in text:
        raise AdapterNotFoundError(f"{text!r}: not an adapter source.")
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
            _check_inside(Path(os.path.realpath(resolve_source(real).path)), roots, text)
            return str(real)
    if allow_hub and _HUB_ID.match(text) and not text.endswith(".safetensors"):
        return text
    if Path(text).is_absolute() or ".." in Path(text).parts:
        raise UnsafeFileError(f"{text}: outside the allowed adapter folders; adapters are read only from them.")
    raise AdapterNotFoundError(
        f"{text}: no such adapter under the allowed folders ({', '.join(map(str, roots))})"
        + ("" if not allow_hub else " and not a Hugging Face id 'org/name'") + "."
    )


def _check_inside(real: Path, roots: Sequence[Path], text: str) -> None:
    if not any(real == root or root in real.parents for root in roots):
        raise UnsafeFileError(f"{text}: outside the allowed adapter folders; adapters are read only from them.")


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
