"""What combine, resize and extract share: reading their inputs with strengths and hashes, the module
inventory, a progress bar, and writing an `Adapter` the way `convert` and `merge` write (atomically).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..errors import InvalidArgumentError, LoRAError
from ..keys import ModuleIndex
from ..mlx.probe import index_of
from ..sources import LoRAConfiguration, parse_strength, resolve_source

SourceItem = str | Path | LoRAConfiguration | Adapter
Source = SourceItem | tuple[SourceItem, object]  # (source, strength)

#: Output dtypes by name (None: keep the inputs' promoted dtype).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Input:
    adapter: Adapter
    strength: float
    file: str
    sha256: str

    def record(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "strength": self.strength, "format": self.adapter.format}


def module_index(model: str | Path | torch.nn.Module | ModuleIndex | None) -> ModuleIndex:
    """The modules adapters resolve against: a model (torch or MLX), a config (file or folder), default
    Z-Image-Turbo."""
    if isinstance(model, ModuleIndex):
        return model
    from ..inventory import inventory_model, load_config

    if isinstance(model, torch.nn.Module):
        return ModuleIndex(model)
    mlx = index_of(model)  # an MLX model: its own tree under diffusers' names
    if mlx is not None:
        return mlx
    if isinstance(model, (str, Path)) and Path(str(model)).is_file() and Path(str(model)).suffix == ".safetensors":
        return ModuleIndex(inventory_model(load_config(None)))  # a single-file checkpoint: Z-Image-Turbo's modules
    return ModuleIndex(inventory_model(load_config(model)))


def read_input(spec: Source, index: ModuleIndex) -> Input:
    """(SOURCE, strength) / "SOURCE[:S]" / LoRAConfiguration / Adapter -> loaded, with its file's sha256."""
    from ..loading import load_adapter
    from ..tools.specs import parse_lora_spec

    strength = 1.0
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise InvalidArgumentError(f"an input pair is (source, strength); got {len(spec)} items: {spec!r}.")
        source, number = spec
        spec, strength = source, parse_strength(number, where=f"strength of {source}")
    if isinstance(spec, Adapter):
        return Input(spec, strength, spec.source or spec.name, _sha256(spec.source))
    cfg = parse_lora_spec(spec) if isinstance(spec, str) else (
        spec if isinstance(spec, LoRAConfiguration) else LoRAConfiguration(spec))
    adapter = load_adapter(cfg, index)
    path = resolve_source(cfg).path
    return Input(adapter, strength * cfg.scale, str(path), _sha256(path))


def _sha256(path: str | Path | None) -> str:
    try:
        p = Path(str(path))
        if not path or not p.is_file():
            return ""
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()
    except OSError:
        return ""


def out_dtype(dtype: str | torch.dtype | None, tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The written factors' dtype: the one asked, else the inputs' floating dtypes promoted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "keep"):
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)} or 'keep'.")
        return DTYPES[dtype]
    result = None
    for t in tensors:
        if t.is_floating_point():
            result = t.dtype if result is None else torch.promote_types(result, t.dtype)
    return result or torch.float32


@contextmanager
def progress(enabled: bool, total: int, what: str) -> Iterator[Callable[..., None]]:
    """A rich progress bar over `total` steps (a no-op callable when disabled)."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   transient=False)
    task = bar.add_task(what, total=total)
    with bar:
        yield lambda n=1: bar.advance(task, n)


def save(adapter: Adapter, out: str | Path, *, to: str = "kohya", overwrite: bool = False) -> Path:
    """Write `adapter` in `convert`'s layout `to`, metadata included, never leaving a broken `out`."""
    from ..layouts import write
    from ..tools.convert import FORMATS, build_state_dict, canonical_items, target_layout
    from ..tools.output import check_out, clean_leftovers, output_error, written_aside

    if to not in FORMATS:
        raise InvalidArgumentError(f"unknown layout {to!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    items = canonical_items(adapter)
    layout = target_layout(to, items)  # `to` names an application (tools/targets.py), not a layout row
    if not layout.folder and out.suffix != ".safetensors":
        raise LoRAError(f"{out}: the output of --to {to} is one file; give a name ending in .safetensors.")
    check_out(out, overwrite)
    sd, metadata, config = build_state_dict(items, to, where=adapter.source or adapter.name)
    try:
        clean_leftovers(out)
        with written_aside(out) as tmp:
            write.save_state_dict(sd, metadata, config, layout, tmp, extra_metadata=adapter.metadata)
    except OSError as exc:
        if isinstance(exc, LoRAError):
            raise
        raise output_error(exc, out) from None
    return out


def metadata_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))
