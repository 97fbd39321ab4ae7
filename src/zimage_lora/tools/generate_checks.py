"""What `generate` can check before it spends a minute loading the pipeline: the output path, every
adapter source (and its header), the device, the image size the model can take, and the model itself.
Each refusal is one `LoRAError` with the fix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import DownloadError, InvalidFormatError, LoRAError
from ..formats import read_header
from ..formats.untrusted import read_json_file
from ..sources import _HUB_ID, LoRAConfiguration, resolve_source
from .output import check_out

DEFAULT_SIZE_MULTIPLE = 16  # Z-Image-Turbo: VAE scale factor 8, x2 for the transformer's patches


def check_image_out(out: Path, overwrite: bool) -> None:
    from PIL import Image

    check_out(out, overwrite)
    if out.suffix.lower() not in Image.registered_extensions():
        raise InvalidFormatError(
            f"--out {out}: '{out.suffix or '(no suffix)'}' is not an image type Pillow can write; "
            "end the name with .png, .jpg or .webp."
        )


def check_adapters(specs: Sequence[LoRAConfiguration]) -> None:
    """Each source exists, is not a pickle, and has a valid safetensors header (no tensor is read)."""
    for spec in specs:
        read_header(resolve_source(spec).path)


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise InvalidFormatError(f"--device {device!r} is not a device torch knows; use cpu or cuda.") from None
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise InvalidFormatError(
            f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build}). "
            "Use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU."
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise InvalidFormatError(f"--device {device}: MPS is not available here. Use --device cpu.")


def check_size(width: int, height: int, steps: int, multiple: int) -> None:
    if steps < 1:
        raise InvalidFormatError(f"--steps must be at least 1 (got {steps}).")
    for name, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            lower = max(multiple, value // multiple * multiple)
            raise InvalidFormatError(
                f"--{name} {value}: this model takes sizes that are multiples of {multiple} (at least {multiple}); "
                f"try --{name} {lower} or {lower + multiple}."
            )


def check_model(model: str | Path) -> int:
    """The pipeline exists where it will be loaded from; returns the size multiple its VAE needs."""
    text = str(model)
    path = Path(text).expanduser()
    try:
        local = path.exists() or not _HUB_ID.match(text)
    except OSError as exc:
        raise LoRAError(f"--model {text[:200]}: not a usable path ({exc.strerror}).") from None
    if local:
        return _local_multiple(path)
    return _cached_multiple(text)


def _local_multiple(path: Path) -> int:
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise LoRAError(
            f"--model {path}: {what}. Pass a diffusers pipeline folder (the one holding model_index.json, e.g. "
            "from `hf download Tongyi-MAI/Z-Image-Turbo --local-dir Z-Image-Turbo`) or a hub id org/name."
        )
    if not (path / "model_index.json").is_file():
        inner = [p.parent.name for p in path.glob("*/model_index.json")][:3]
        hint = f" It holds {', '.join(inner)}/model_index.json: pass that folder." if inner else ""
        if (path / "config.json").is_file() and (path.parent / "model_index.json").is_file():
            hint = f" It looks like one component of a pipeline: pass {path.parent}."
        raise LoRAError(
            f"--model {path}: no model_index.json, so not a diffusers pipeline folder.{hint} A transformer folder "
            "alone is not enough for generate (use `zimage-lora merge` for that)."
        )
    return _multiple_from(path / "vae" / "config.json")


def _cached_multiple(repo_id: str) -> int:
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if not isinstance(cached, str):
        if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise DownloadError(
                f"--model {repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set. Download it once "
                f"while online (`hf download {repo_id}`), point HF_HOME at a cache that has it, or pass a local "
                "pipeline folder."
            )
        return DEFAULT_SIZE_MULTIPLE  # it will be downloaded; its VAE config is not known yet
    vae_config = try_to_load_from_cache(repo_id, "vae/config.json")
    return _multiple_from(Path(vae_config)) if isinstance(vae_config, str) else DEFAULT_SIZE_MULTIPLE


def _multiple_from(vae_config: Path) -> int:
    """ZImagePipeline: sizes must divide by 2 * 2 ** (len(vae.block_out_channels) - 1)."""
    if not vae_config.is_file():
        return DEFAULT_SIZE_MULTIPLE
    doc = read_json_file(vae_config, what="the VAE config")
    blocks = doc.get("block_out_channels") if isinstance(doc, dict) else None
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
        return DEFAULT_SIZE_MULTIPLE
    multiple: int = 2 * 2 ** (len(blocks) - 1)
    return multiple
