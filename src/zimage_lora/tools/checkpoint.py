"""Base checkpoints on disk, opened without reading weights: a diffusers transformer folder (config,
safetensors shards, index) or one safetensors file (ComfyUI-style, fused qkv, optional prefix).

The module inventory comes from the config (a meta-device model) when there is one, else from the
tensor names and shapes themselves, so fused-qkv checkpoints resolve under their own names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterNotFoundError, DownloadError, InvalidFormatError
from ..formats.safetensors_file import DTYPES, Header, TensorInfo, read_header
from ..keys import ModuleIndex

# Prefixes of the diffusion model inside ComfyUI / original single-file checkpoints.
SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
INDEX_SUFFIX = ".safetensors.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Checkpoint:
    """Where every tensor of a checkpoint lives. `prefix` is stripped to get module names."""

    root: Path
    kind: str  # "folder" or "file"
    files: list[Path]
    headers: dict[Path, Header]
    config: dict | None = None
    index_name: str | None = None
    index_doc: dict | None = None
    prefix: str = ""
    extra_files: list[Path] = field(default_factory=list)

    def tensors(self) -> list[tuple[Path, TensorInfo]]:
        """Every tensor in file order, then in data order within each file."""
        out = []
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

            return ModuleIndex(inventory_model(self.config))
        return ModuleIndex(stand_in_model(self.tensors(), self.prefix))


def resolve_model_path(model: str | Path) -> Path:
    """A local folder/file, or a hub id found in the Hugging Face cache (downloaded when online)."""
    path = Path(str(model)).expanduser()
    if path.exists():
        return path
    text = str(model)
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
    from ..inventory import load_config

    config = load_config(folder) if (folder / "config.json").is_file() else None
    indexes = sorted(folder.glob("*" + INDEX_SUFFIX))
    index_name, index_doc = None, None
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise InvalidFormatError(f"{folder}: several shard indexes ({names}); keep one.")
    if indexes:
        index_name = indexes[0].name
        try:
            index_doc = json.loads(indexes[0].read_text())
            weight_map = index_doc["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidFormatError(f"{indexes[0]}: not a valid shard index ({exc}).") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        for f in files:
            if f.parent != folder or not f.is_file():
                raise InvalidFormatError(f"{indexes[0]}: shard {f.name!r} is missing from {folder}.")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapterNotFoundError(f"{folder}: no .safetensors weights found.")
    headers = {f: read_header(f) for f in files}
    _check_unique_keys(headers)
    extra = [p for p in folder.iterdir() if p.is_file() and p.suffix == ".json" and p.name != index_name]
    return Checkpoint(
        root=folder, kind="folder", files=files, headers=headers, config=config,
        index_name=index_name, index_doc=index_doc, extra_files=extra,
    )


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
    entries: dict[str, dict] = {}
    for key, info in keys.items():
        if not key.startswith(prefix) or not key.endswith(".weight"):
            continue
        name = key[len(prefix): -len(".weight")]
        if not name or DTYPES[info.dtype][0].is_floating_point is False or len(info.shape) not in (1, 2):
            continue
        linear = len(info.shape) == 2
        entries[name] = {"shape": list(info.shape), "bias": linear and f"{prefix}{name}.bias" in keys, "linear": linear}
    return stand_in_tree({n: entries[n] for n in sorted(entries, key=lambda n: n.count("."))})

