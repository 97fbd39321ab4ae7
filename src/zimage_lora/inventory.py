"""Module inventories without weights.

The default inventory (Z-Image-Turbo) is read from bundled data (`data/zimage_turbo_modules.json`,
written by `python -m zimage_lora.inventory` from diffusers' model on the meta device): building it
needs neither diffusers nor a model download, so `inspect` and `convert` start in a fraction of a
second. Any other config is built as a `ZImageTransformer2DModel` on the meta device.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import AdapterNotFoundError, InvalidFormatError

MODULES_FILE = "data/zimage_turbo_modules.json"


def default_config() -> dict[str, Any]:
    """The Z-Image-Turbo transformer config (30 layers, width 3840), shipped with the package."""
    text = resources.files("zimage_lora").joinpath("data/zimage_turbo_config.json").read_text()
    config: dict[str, Any] = json.loads(text)
    return config


def load_config(path: str | Path | None) -> dict[str, Any]:
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


def meta_model(config: dict[str, Any] | None = None) -> torch.nn.Module:
    """A `ZImageTransformer2DModel` with no storage: module names and shapes only."""
    from .quiet import quiet_imports

    with quiet_imports():
        from diffusers import ZImageTransformer2DModel

    cfg = default_config() if config is None else config
    try:
        with torch.device("meta"):
            make: Any = ZImageTransformer2DModel  # diffusers' register_to_config leaves its constructor untyped
            model: torch.nn.Module = make(**cfg)
            return model
    except TypeError as exc:
        raise InvalidFormatError(f"the config does not fit ZImageTransformer2DModel: {exc}") from None


def inventory_model(config: dict[str, Any] | None = None) -> torch.nn.Module:
    """What the key resolver needs of a model (adaptable module names and shapes), as cheaply as
    possible: the bundled stand-in for the default config, else the meta-device diffusers model."""
    if config is None or config == default_config():
        return stand_in_tree(bundled_modules())
    return meta_model(config)


# --- bundled data --------------------------------------------------------------------------------------

def module_entries(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """Every module the key resolver indexes, as JSON-ready {name: {shape, bias, linear}}."""
    from .keys.index import module_shape

    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        shape = module_shape(module) if name else None
        if shape is not None:
            out[name] = {"shape": list(shape.shape), "bias": shape.bias, "linear": shape.is_linear}
    return out


def bundled_modules() -> dict[str, dict[str, Any]]:
    text = resources.files("zimage_lora").joinpath(MODULES_FILE).read_text()
    modules: dict[str, dict[str, Any]] = json.loads(text)["modules"]
    return modules


class StandInNorm(torch.nn.Module):
    """A norm layer's 1-D weight on the meta device (only full diffs can target it)."""

    def __init__(self, n: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(n, device="meta"))
        self.bias = torch.nn.Parameter(torch.empty(n, device="meta")) if bias else None


def stand_in_tree(entries: dict[str, dict[str, Any]]) -> torch.nn.Module:
    """A module tree of meta Linear / norm layers with the given names, shapes and biases."""
    leaves: dict[str, torch.nn.Module] = {}
    for name, e in entries.items():
        if e["linear"]:
            out_f, in_f = e["shape"]
            leaves[name] = torch.nn.Linear(in_f, out_f, bias=e["bias"], device="meta")
        else:
            leaves[name] = StandInNorm(e["shape"][0], e["bias"])
    root = torch.nn.Module()
    for name in sorted(leaves, key=lambda n: n.count(".")):
        parent = root
        *path, last = name.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                parent.add_module(part, child)
            parent = child
        existing = parent._modules.get(last)
        leaf = leaves[name]
        if existing is not None:  # a container made earlier for a deeper name: keep its children
            for child_name, child in existing.named_children():
                leaf.add_module(child_name, child)
        parent.add_module(last, leaf)
    return root


def write_bundled(path: Path) -> None:
    """Regenerate the bundled inventory from diffusers' model (run when diffusers changes the model)."""
    import diffusers

    source = f"diffusers {diffusers.__version__} ZImageTransformer2DModel(**zimage_turbo_config.json), meta device"
    rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in module_entries(meta_model()).items()]
    path.write_text(f'{{"source": {json.dumps(source)},\n "modules": {{\n' + ",\n".join(rows) + "\n}}\n")


if __name__ == "__main__":
    write_bundled(Path(__file__).parent / MODULES_FILE)
