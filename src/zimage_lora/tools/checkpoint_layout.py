"""The key layout of a single-file merged checkpoint: ComfyUI's native names or diffusers' names.

`merge --out x.safetensors --layout comfyui` writes the original / ComfyUI module names with q, k and
v fused into one `attention.qkv` tensor (rows q, k, v: what ComfyUI's Z-Image model loads from
`models/diffusion_models/`); `--layout diffusers` writes diffusers' `ZImageTransformer2DModel` names
with q, k, v split. The default, `same`, keeps the input's own names. The translation is a view on
the streaming writer: tensors arrive in the input's order under the input's keys and leave renamed,
fused (q and k are held until v arrives: three rows blocks of one layer) or split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidArgumentError
from ..formats.safetensors_writer import StreamingWriter
from ..keys.aliases import NAME_ALIASES, SPLIT_QKV, native_name

#: `--layout` choices; the first is the default.
LAYOUTS = ("same", "comfyui", "diffusers")
QKV = "attention.qkv"

Entry = tuple[str, torch.dtype, tuple[int, ...]]


def _split_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def _diffusers_name(name: str) -> str:
    """Native / ComfyUI module name -> diffusers' (out -> to_out.0, q_norm -> norm_q, ...)."""
    for diffusers_seg, native_seg in NAME_ALIASES:
        name = f".{name}.".replace(f".{native_seg}.", f".{diffusers_seg}.", 1)[1:-1]
    return name


def check_layout(layout: str, single_file: bool) -> str:
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"unknown --layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if layout != "same" and not single_file:
        raise InvalidArgumentError(
            f"--layout {layout} applies to a single-file output; a folder --out keeps the input's diffusers "
            "shards. Give --out a name ending in .safetensors, or leave --layout out."
        )
    return layout


@dataclass
class Relayout:
    """Output entries of the input's tensors `entries` (input order) written in `layout`."""

    entries: list[Entry]
    prefix: str
    layout: str
    out: list[Entry] = field(init=False, default_factory=list)
    # input key -> (output key, row slice or None) for renames and splits; q/k/v parts of a fused key
    _outputs: dict[str, list[tuple[str, slice | None]]] = field(init=False, default_factory=dict)
    _groups: dict[str, list[str]] = field(init=False, default_factory=dict)  # fused key -> its q, k, v input keys

    def __post_init__(self) -> None:
        shapes = {k: (d, s) for k, d, s in self.entries}
        position = {k: i for i, (k, _d, _s) in enumerate(self.entries)}
        for key, dtype, shape in self.entries:
            name = key[len(self.prefix):] if key.startswith(self.prefix) else key
            module, leaf = _split_key(name)
            if self.layout == "comfyui" and module.endswith(SPLIT_QKV):
                block = module[: -len(SPLIT_QKV[0])]
                fused = _join(native_name(block + QKV), leaf)
                parts = [self.prefix + _join(block + p, leaf) for p in SPLIT_QKV]
                if all(p in shapes for p in parts):
                    self._outputs[key] = [(fused, None)]
                    self._groups[fused] = parts
                    if key == max(parts, key=position.__getitem__):  # written when its last part arrives
                        rows = sum(shapes[p][1][0] for p in parts)
                        self.out.append((fused, dtype, (rows, *shape[1:])))
                    continue
            if self.layout == "diffusers" and module.endswith(QKV) and shape and shape[0] % 3 == 0:
                block = module[: -len(QKV)]
                third = shape[0] // 3
                self._outputs[key] = [(_join(_diffusers_name(block) + p, leaf), slice(i * third, (i + 1) * third))
                                   for i, p in enumerate(SPLIT_QKV)]
                self.out += [(k, dtype, (third, *shape[1:])) for k, _s in self._outputs[key]]
                continue
            renamed = native_name(module) if self.layout == "comfyui" else _diffusers_name(module)
            self._outputs[key] = [(_join(renamed, leaf), None)]
            self.out.append((_join(renamed, leaf), dtype, tuple(shape)))
        self._shapes = shapes
        self._held: dict[str, torch.Tensor] = {}

    def sink(self, writer: StreamingWriter) -> _Sink:
        return _Sink(self, writer)


class _Sink:
    """Takes `write` / `write_raw` under input keys, writes the output keys to `writer`."""

    def __init__(self, relayout: Relayout, writer: StreamingWriter) -> None:
        self.relayout, self.writer = relayout, writer

    def write_raw(self, key: str, data: torch.Tensor) -> None:
        targets = self.relayout._outputs[key]
        if len(targets) == 1 and targets[0][0] not in self.relayout._groups:
            self.writer.write_raw(targets[0][0], data)
            return
        dtype, shape = self.relayout._shapes[key]
        self.write(key, data.view(dtype).reshape(shape) if data.numel() else torch.empty(shape, dtype=dtype))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        for out_key, rows in self.relayout._outputs[key]:
            parts = self.relayout._groups.get(out_key)
            if parts is None:
                self.writer.write(out_key, tensor if rows is None else tensor[rows])
                continue
            self.relayout._held[key] = tensor
            if all(p in self.relayout._held for p in parts):
                self.writer.write(out_key, torch.cat([self.relayout._held.pop(p) for p in parts]))
