"""Base checkpoints on disk, opened without reading weights: a diffusers transformer folder (config,
safetensors shards, index) or one safetensors file (ComfyUI-style, fused qkv, optional prefix).

The module inventory comes from the config (a meta-device model) when there is one, else from the
tensor names and shapes themselves, so fused-qkv checkpoints resolve under their own names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterNotFoundError, DownloadError, InvalidFormatError
from ..formats.safetensors_file import DTYPES, Header, TensorInfo, read_header
from ..formats.untrusted import read_json_file
from ..keys import ModuleIndex
from ..sources import _HUB_ID

# Prefixes of the diffusion model inside ComfyUI / original single-file checkpoints.
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class Checkpoint:
    """Where every tensor of a checkpoint lives. `prefix` is stripped to get module names."""

    root: Path
    kind: str  # "folder" or "file"
    files: list[Path]
    headers: dict[Path, Header]
    config: dict[str, Any] | None = None
    index_name: str | None = None
    index_doc: dict[str, Any] | None = None
    prefix: str = ""
    extra_files: list[Path] = field(default_factory=list)

    def tensors(self) -> list[tuple[Path, TensorInfo]]:
        """Every tensor in file order, then in data order within each file."""
        out: list[tuple[Path, TensorInfo]] = []
        for path in self.files:
            infos = sorted(self.headers[path].tensors.values(), key=lambda t: t.start)
            out.extend((path, info) for info in infos)
        return out

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _p, info in self.tensors())

    def module_index(self) -> ModuleIndex:
        if self.config is not None:
            from ..inventory import inventory_model

            try:
                return ModuleIndex(inventory_model(self.config))
            except Exception as exc:  # the config passed our checks but the model class refuses it
                raise InvalidFormatError(
                    f"{self.root / 'config.json'}: the config does not build a ZImageTransformer2DModel "
                    f"({str(exc)[:200]}). Fix config.json or use the model's original one."
                ) from None
        return ModuleIndex(stand_in_model(self.tensors(), self.prefix))


def resolve_model_path(model: str | Path) -> Path:
    """A local folder/file, or a hub id found in the Hugging Face cache (downloaded when online)."""
    path = Path(str(model)).expanduser()
    text = str(model)
    try:
        if path.exists():
            return path
    except OSError as exc:  # e.g. a name too long for the file system
        raise AdapterNotFoundError(f"{text[:200]}: not a usable model path ({exc.strerror}). Check --model.") from None
    if not _HUB_ID.match(text) or text.endswith(".safetensors"):
        raise AdapterNotFoundError(f"{text}: no such model folder or file, and not a hub id 'org/name'.")
    from huggingface_hub import snapshot_download

    patterns = ["transformer/*"]
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=patterns, local_files_only=True)) / "transformer"
    except Exception:  # not cached: try the network next
        pass
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=patterns)) / "transformer"
    except Exception as exc:
        raise DownloadError(
            f"{text}: the transformer is not in the Hugging Face cache and could not be downloaded ({exc}). "
            f"Download it once while online (`hf download {text} --include 'transformer/*'`) or pass a local path."
        ) from None


def open_checkpoint(model: str | Path) -> Checkpoint:
    path = resolve_model_path(model)
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
            path = path / "transformer"  # a whole pipeline folder
        return _open_folder(path)
    if path.suffix != ".safetensors":
        raise InvalidFormatError(f"{path}: expected a .safetensors checkpoint or a diffusers transformer folder.")
    header = read_header(path)
    return Checkpoint(
        root=path, kind="file", files=[path], headers={path: header}, prefix=_single_file_prefix(header)
    )


def _open_folder(folder: Path) -> Checkpoint:
    """Everything the merge will rely on is read and checked here, before a byte is written."""
    config = _read_config(folder / "config.json") if (folder / "config.json").is_file() else None
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    index_name, index_doc, weight_map = None, None, None
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise InvalidFormatError(f"{folder}: several shard indexes ({names}); keep one.")
    if indexes:
        index_name = indexes[0].name
        index_doc, weight_map = _read_index(indexes[0])
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise InvalidFormatError(f"{indexes[0]}: shard {f.name!r} is missing from {folder}.")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapterNotFoundError(f"{folder}: no .safetensors weights found.")
    headers = {f: read_header(f) for f in files}
    _check_unique_keys(headers)
    if weight_map is not None:
        _check_weight_map(indexes[0], weight_map, headers)
    extra = [p for p in folder.iterdir() if p.is_file() and p.suffix == ".json" and p.name != index_name]
    return Checkpoint(
        root=folder, kind="folder", files=files, headers=headers, config=config,
        index_name=index_name, index_doc=index_doc, extra_files=extra,
    )


_FIX_INDEX = "Re-create the index, or delete it to merge every .safetensors file in the folder."


def _read_index(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    doc = read_json_file(path, what="the shard index", fix=_FIX_INDEX)
    if not isinstance(doc, dict):
        kind = type(doc).__name__
        raise InvalidFormatError(f"{path}: a shard index must be a JSON object, found {kind}. {_FIX_INDEX}")
    weight_map, metadata = doc.get("weight_map"), doc.get("metadata")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidFormatError(f"{path}: 'weight_map' must be an object of tensor name -> shard file. {_FIX_INDEX}")
    if metadata is not None and not isinstance(metadata, dict):
        kind = type(metadata).__name__
        raise InvalidFormatError(f"{path}: 'metadata' must be a JSON object, found {kind}. {_FIX_INDEX}")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or Path(shard).name != shard:
            raise InvalidFormatError(
                f"{path}: weight_map['{key[:200]}'] is {shard!r}; expected the name of a .safetensors shard in the "
                f"same folder. {_FIX_INDEX}"
            )
    return doc, weight_map


def _check_weight_map(path: Path, weight_map: dict[str, str], headers: dict[Path, Header]) -> None:
    by_name = {p.name: h for p, h in headers.items()}
    for key, shard in weight_map.items():
        if key not in by_name[shard].tensors:
            raise InvalidFormatError(
                f"{path}: names tensor '{key[:200]}' in {shard}, which does not hold it. {_FIX_INDEX}"
            )


# Config fields that size the model: each must be a whole number in its range (a 0 divides by zero,
# 10**30 would try to build an impossible model).
_CONFIG_INTS = {
    "dim": (1, 1 << 16), "n_layers": (0, 1024), "n_refiner_layers": (0, 1024), "n_heads": (1, 1024),
    "n_kv_heads": (1, 1024), "in_channels": (1, 1 << 12), "cap_feat_dim": (1, 1 << 16),
}
_CONFIG_INT_LISTS = {"all_patch_size": (1, 64), "all_f_patch_size": (1, 64), "axes_dims": (1, 1 << 12),
                     "axes_lens": (1, 1 << 20)}


def _read_config(path: Path) -> dict[str, Any]:
    fix = "Fix config.json or use the model's original one."
    doc = read_json_file(path, what="the model config", fix=fix)
    if not isinstance(doc, dict):
        kind = type(doc).__name__
        raise InvalidFormatError(f"{path}: the model config must be a JSON object, found {kind}. {fix}")
    for name, (lo, hi) in _CONFIG_INTS.items():
        if name in doc and not _whole(doc[name], lo, hi):
            raise InvalidFormatError(
                f"{path}: '{name}' is {_show(doc[name])}; expected a whole number in {lo}..{hi}. {fix}"
            )
    for name, (lo, hi) in _CONFIG_INT_LISTS.items():
        value = doc.get(name)
        ok = isinstance(value, list) and 0 < len(value) <= 16 and all(_whole(v, lo, hi) for v in value)
        if name in doc and not ok:
            raise InvalidFormatError(
                f"{path}: '{name}' is {_show(value)}; expected a list of whole numbers in {lo}..{hi}. {fix}"
            )
    dim, heads = doc.get("dim"), doc.get("n_heads")
    if isinstance(dim, int) and isinstance(heads, int) and dim % heads:
        raise InvalidFormatError(f"{path}: 'dim' {dim} is not a multiple of 'n_heads' {heads}. {fix}")
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def _whole(value: object, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _check_unique_keys(headers: dict[Path, Header]) -> None:
    seen: dict[str, Path] = {}
    for path, header in headers.items():
        for key in header.tensors:
            if key in seen:
                raise InvalidFormatError(f"key '{key}' is in both {seen[key].name} and {path.name}.")
            seen[key] = path


def _single_file_prefix(header: Header) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if any(k.startswith(prefix) for k in header.tensors):
            return prefix
    return ""


def stand_in_model(tensors: list[tuple[Path, TensorInfo]], prefix: str = "") -> torch.nn.Module:
    """A module tree of meta Linear / norm layers named after the checkpoint's weight keys."""
    from ..inventory import stand_in_tree

    keys = {info.key: info for _p, info in tensors}
    entries: dict[str, dict[str, Any]] = {}
    for key, info in keys.items():
        if not key.startswith(prefix) or not key.endswith(".weight"):
            continue
        name = key[len(prefix): -len(".weight")]
        if not name or DTYPES[info.dtype][0].is_floating_point is False or len(info.shape) not in (1, 2):
            continue
        linear = len(info.shape) == 2
        entries[name] = {"shape": list(info.shape), "bias": linear and f"{prefix}{name}.bias" in keys, "linear": linear}
    return stand_in_tree({n: entries[n] for n in sorted(entries, key=lambda n: n.count("."))})

