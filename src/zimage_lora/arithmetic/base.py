"""The base weights that weight-dependent deltas need in combine and resize.

DoRA, OFT, BOFT, GLoRA and IA3 change a weight by an amount that depends on the weight itself, so
their dense delta (what applying them at strength 1 adds: `merge_weight` on the base, minus the base)
exists only given the base model: a torch model with real weights (Python API), or a checkpoint as
`merge` reads it (a diffusers transformer folder with shards, or one safetensors file, native fused
q/k/v names included: `tools/checkpoint.py`). One module's weight is read at a time, when a
weight-dependent target needs it, and dropped after.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import IncompatibleWeightsError, InvalidArgumentError
from ..formats.safetensors_file import DTYPES
from ..keys.aliases import FUSED_QKV, native_name, qkv_block, qkv_names

#: What a user gives to make weight-dependent inputs usable, for messages.
FIX = ("give the base model: --model <diffusers transformer folder or .safetensors checkpoint> on the command "
       "line, model=<the torch model with its weights> in Python")


class BaseWeights:
    """`weight(module)`: the fp32 weight of a diffusers-named module, read when asked."""

    def __init__(self, read: Callable[[str], torch.Tensor | None], where: str) -> None:
        self._read = read
        self.where = where

    def get(self, module: str) -> torch.Tensor | None:
        """The fp32 weight, or None where the model has none of that name."""
        w = self._read(module)
        return None if w is None else w.float()

    def weight(self, module: str, shape: tuple[int, ...]) -> torch.Tensor:
        w = self._read(module)
        if w is None:
            raise IncompatibleWeightsError(f"{self.where}: has no weight for module '{module}'; {FIX}.")
        if tuple(w.shape) != tuple(shape):
            raise IncompatibleWeightsError(
                f"{self.where}: module '{module}' is {list(w.shape)}, the adapters were resolved against "
                f"{list(shape)}; give the checkpoint of the model the adapters are for.")
        return w.float()


def base_weights(model: object) -> BaseWeights | None:
    """The weights of `model` when it has them (None: a config, a meta model, nothing)."""
    if isinstance(model, torch.nn.Module):
        if any(p.is_meta for p in model.parameters()):
            return None
        modules = dict(model.named_modules())

        def from_module(name: str) -> torch.Tensor | None:
            w = getattr(modules.get(name), "weight", None)
            return w.detach().clone() if isinstance(w, torch.Tensor) else None

        return BaseWeights(from_module, type(model).__name__)
    if isinstance(model, (str, Path)) and has_weights(Path(str(model))):
        return _from_checkpoint(Path(str(model)))
    return None


def has_weights(path: Path) -> bool:
    """A .safetensors file, or a folder (or its transformer/) holding safetensors shards."""
    if path.is_file():
        return path.suffix == ".safetensors"
    return path.is_dir() and any(next(p.glob("*.safetensors"), None) is not None
                                 for p in (path, path / "transformer"))


def _from_checkpoint(path: Path) -> BaseWeights:
    from ..tools.checkpoint import open_checkpoint
    from ..tools.checkpoint_merge import _decode, _read_raw

    ckpt = open_checkpoint(path)
    where = {info.key[len(ckpt.prefix):]: (p, info) for p, info in ckpt.tensors()}

    def read(key: str) -> torch.Tensor | None:
        if key not in where:
            return None
        p, info = where[key]
        with open(p, "rb") as fh:
            return _decode(_read_raw(fh, ckpt.headers[p].data_start, info), DTYPES[info.dtype][0], info.shape)

    def from_checkpoint(module: str) -> torch.Tensor | None:
        for name in (module, native_name(module)):  # diffusers shards, or a single file's native names
            w = read(name + ".weight")
            if w is not None:
                return w
        block = qkv_block(module)
        if block is None:
            return None
        fused = read(native_name(block + FUSED_QKV) + ".weight")  # q, k, v: row thirds of attention.qkv
        if fused is None:
            return None
        i, d = list(qkv_names(block)).index(module), fused.shape[0] // 3
        return fused[i * d:(i + 1) * d]

    return BaseWeights(from_checkpoint, str(ckpt.root))


def require(base: BaseWeights | None, source: str, label: str, what: str) -> BaseWeights:
    if base is None:
        raise InvalidArgumentError(
            f"{source}: module {label} holds a {what} delta, which depends on the base weight; {FIX} "
            "(a config alone has no weights).")
    return base


__all__ = ["FIX", "BaseWeights", "base_weights", "has_weights", "require"]
