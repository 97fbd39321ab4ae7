"""Rewrite an adapter into the layout an application loads: ComfyUI, musubi-tuner / kohya, diffusers,
PEFT, ai-toolkit (`tools/targets.py` names each target and who loads it).

The adapter is first read into the canonical form (resolved against a Z-Image module inventory),
then written from it: nothing depends on the source layout. LoRA converts exactly (alpha carried
as alpha, never folded unless q/k/v with different scales must share one fused alpha); what a
target layout cannot hold (LoKr in PEFT keys, a norm diff in diffusers keys) is refused with the
reason and the layouts that can hold it. Every written key is checked against the key rules of the
application the target names (`tools/loaders.py`) before the file is kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch

from .. import algorithms
from ..adapter import Adapter, Dora, Target
from ..errors import LoRAError, UnsupportedError
from ..keys.aliases import FUSED_QKV, qkv_block, qkv_names
from ..layouts import Item, Layout, write
from ..sources import LoRAConfiguration
from . import loaders, targets
from .output import clean_leftovers, output_error, written_aside

#: The `--to` choices: targets named by the applications that load them, then their aliases.
FORMATS = targets.NAMES


class ComfyUIDifferenceWarning(UserWarning):
    """ComfyUI will apply part of a converted file differently from the trainers (PEFT, LyCORIS)."""


def convert_adapter(
    source: str | Path | LoRAConfiguration | Adapter,
    to: str,
    out: str | Path,
    *,
    model: str | Path | torch.nn.Module | None = None,
    overwrite: bool = False,
) -> Path:
    """Read `source`, write it for the application target `to` at `out` (a .safetensors file; a folder
    for "peft"). Where ComfyUI computes part of it differently, a `ComfyUIDifferenceWarning` says how."""
    targets.get(to)  # an unknown target is refused before anything is read
    out = Path(out)
    if out.exists() and not overwrite:
        raise LoRAError(f"{out} already exists; choose another --out or pass --overwrite.")
    inventory = _inventory(model)
    adapter = source if isinstance(source, Adapter) else _load(source, inventory)
    items = canonical_items(adapter)
    from ..arithmetic.base import base_weights

    base = base_weights(model)  # a model with its weights lets the ComfyUI warnings measure DoRA too
    sd, metadata, config = build_state_dict(items, to, adapter.source, inventory, stacklevel=3,
                                            weight=None if base is None else base.get)
    layout = target_layout(to, items)
    if not layout.folder and out.suffix != ".safetensors":
        raise LoRAError(f"{out}: the output of --to {to} is one file; give a name ending in .safetensors.")
    metadata["zimage_lora_converted_from"] = adapter.format
    # Written aside, then moved in: an interrupted or failed write never leaves a broken `out` behind,
    # and an existing `out` stays as it was until the new one is complete.
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(out)
        with written_aside(out) as tmp:
            write.save_state_dict(sd, metadata, config, layout, tmp)
    except OSError as exc:
        raise output_error(exc, out) from None
    return out


def _inventory(model: str | Path | torch.nn.Module | None) -> torch.nn.Module:
    from ..inventory import inventory_model, load_config

    return model if isinstance(model, torch.nn.Module) else inventory_model(load_config(model))


def _load(source: str | Path | LoRAConfiguration, model: torch.nn.Module) -> Adapter:
    from ..loading import load_adapter

    return load_adapter(source, model)


# --- canonical items ---------------------------------------------------------------------------------

def canonical_items(adapter: Adapter) -> list[Item]:
    """The adapter's targets as one Item per diffusers module (or per fused qkv block)."""
    items: list[Item] = []
    fused: dict[tuple[str, ...], list[Target]] = {}
    for t in adapter.targets:
        if t.rows is not None:
            raise UnsupportedError(
                f"{adapter.source}: target {t.label} covers rows of a fused layer; convert resolves adapters "
                "against the split (diffusers) inventory: pass a diffusers config with --model."
            )
        if t.delta_rows is not None:
            fused.setdefault(t.source_keys, []).append(t)
            if len(fused[t.source_keys]) == 1:
                items.append(Item(name="", algorithm=t.algorithm, tensors={}, source_keys=t.source_keys))
            continue
        items.append(_item(t))
    for i, item in enumerate(items):
        if not item.name:
            items[i] = _fused_item(adapter, fused[item.source_keys])
    return items


def _item(t: Target) -> Item:
    # What a written file holds is the algorithm's (Algorithm.canonical: LoCon mid folded, LoKr scale).
    tensors, scale, rank = algorithms.get(t.algorithm).canonical(dict(t.tensors), t.scale, t.rank)
    return Item(t.module, t.algorithm, tensors, scale, rank, t.dora, t.source_keys)


def _fused_item(adapter: Adapter, parts: list[Target]) -> Item:
    block = qkv_block(parts[0].module)
    expected = list(qkv_names(block)) if block is not None else []
    rows = parts[0].delta_rows
    assert rows is not None  # the caller passes the parts of a fused delta
    if [p.module for p in parts] != expected or rows[0] != 0:
        raise UnsupportedError(
            f"{adapter.source}: a fused delta ({parts[0].source_keys[0]}) lands on {[p.label for p in parts]}; "
            "only a whole q/k/v block can be written back."
        )
    assert block is not None  # `expected` matched
    first = _item(parts[0])
    dora = None
    if parts[0].dora is not None:
        if not parts[0].dora.on_out:
            dora = parts[0].dora
        else:
            dora = Dora(torch.cat([cast(Dora, p.dora).magnitude for p in parts]), on_out=True)
    return Item(block + FUSED_QKV, first.algorithm, first.tensors, first.scale, first.rank, dora, first.source_keys)


def target_layout(to: str, items: list[Item]) -> Layout:
    """The layout row the `convert --to` target `to` writes `items` with."""
    return write.layout(targets.layout_for(targets.get(to), items))


def build_state_dict(items: list[Item], to: str, where: str = "adapter",
                     model: torch.nn.Module | None = None, *, stacklevel: int = 2,
                     weight: Callable[[str], torch.Tensor | None] | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, object] | None]:
    """(tensors, safetensors metadata, PEFT config or None) of `items` for the `convert --to` target `to`,
    checked against the key rules of the application it names on `model`'s modules (default: the
    Z-Image-Turbo inventory). Where ComfyUI computes part of it differently, a
    `ComfyUIDifferenceWarning` says how."""
    target = targets.get(to)
    comfyui = target.loader == "comfyui"
    differences: list[str] = []
    if comfyui:  # measured on the items as read; written with OFT's constraint applied (comfyui_items)
        measured = None if weight is None else targets.dora_gaps(items, weight)
        differences = targets.comfyui_differences(((i.name, i.algorithm, i.dora, i.tensors) for i in items),
                                                  measured)
        items = targets.comfyui_items(items)
    sd, metadata, config = write.state_dict(
        items, targets.layout_for(target, items), where, shown=to, families=target.families,
        reasons=targets.COMFYUI_REFUSED if comfyui else None,
    )
    modules = {n: m for n, m in _inventory(model).named_modules() if n}
    loaders.require_loadable(loaders.LOADERS[target.loader], sd, modules, where, to, target.fix)
    for line in differences:
        warnings.warn(f"{where}: in ComfyUI, {line}", ComfyUIDifferenceWarning, stacklevel=stacklevel)
    return sd, metadata, config


__all__ = ["FORMATS", "ComfyUIDifferenceWarning", "Item", "build_state_dict", "canonical_items", "convert_adapter",
           "target_layout"]
