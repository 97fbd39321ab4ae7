"""Module inventories without weights: a Z-Image transformer built on the meta device from a config."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from .errors import AdapterNotFoundError, InvalidFormatError


def default_config() -> dict:
    """The Z-Image-Turbo transformer config (30 layers, width 3840), shipped with the package."""
    text = resources.files("zimage_lora").joinpath("data/zimage_turbo_config.json").read_text()
    return json.loads(text)


def load_config(path: str | Path | None) -> dict:
    """A diffusers transformer folder, its config.json, or None for the default config."""
    if path is None:
        return default_config()
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "config.json", path / "transformer" / "config.json"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise AdapterNotFoundError(f"{path}: no config.json (expected a diffusers transformer folder).")
    if not path.is_file():
        raise AdapterNotFoundError(f"{path}: no such model folder or config file.")
    from .formats.untrusted import read_json_file

    cfg = read_json_file(path, what="the model config")
    if not isinstance(cfg, dict):
        raise InvalidFormatError(f"{path}: the model config must be a JSON object, found {type(cfg).__name__}.")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def meta_model(config: dict | None = None) -> torch.nn.Module:
    """A `ZImageTransformer2DModel` with no storage: module names and shapes only."""
    from diffusers import ZImageTransformer2DModel

    cfg = default_config() if config is None else config
    try:
        with torch.device("meta"):
            return ZImageTransformer2DModel(**cfg)
    except TypeError as exc:
        raise InvalidFormatError(f"the config does not fit ZImageTransformer2DModel: {exc}") from None
