"""Writing: `Item`s (one module's adapter in diffusers naming) -> the tensors, metadata and PEFT
config of one layout, spelled by its row in `tables.LAYOUTS`.

Used by `convert` (an adapter read from any file) and by `examples` (the demo's example files).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import algorithms
from ..errors import UnsupportedError
from ..keys.aliases import native_name
from .fuse import fuse_qkv_items
from .item import Item
from .tables import LAYOUTS, PEFT_LORA, Layout


def layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r}; known: {', '.join(LAYOUTS)}") from None


def module_stem(lay: Layout, name: str) -> str:
    """The key stem of diffusers module `name` in layout `lay`: prefix + the module as it spells it."""
    if lay.native:
        name = native_name(name)
    return lay.prefix + (name.replace(".", "_") if lay.flat else name)


def suffix(lay: Layout, family: str, role: str) -> str:
    s = lay.suffixes[family][role]
    if lay.adapter_name and s.endswith(".weight"):
        return s[: -len(".weight")] + f".{lay.adapter_name}.weight"
    return s


def _spelled(lay: Layout, algorithm: str, role: str) -> tuple[str, str]:
    """(family, role) whose suffix spells `role` of `algorithm`: its own; the bias diff's; the scale's
    alpha for an alpha the algorithm keeps as a tensor (`Algorithm.alpha_role`)."""
    if role == "diff_b":
        return "full", role
    algo = algorithms.get(algorithm)
    return ("scale", "alpha") if role == algo.alpha_role else (algo.family, role)


def _can_spell(lay: Layout, algorithm: str, role: str) -> bool:
    family, spelled_role = _spelled(lay, algorithm, role)
    return spelled_role in lay.suffixes.get(family, {})


def refusal(lay: Layout, item: Item, families: tuple[str, ...] | None = None) -> str | None:
    """What in `item` layout `lay` (restricted to `families` when given) cannot hold (None: it can)."""
    spelled = lay.suffixes
    family = algorithms.get(item.algorithm).family
    if family not in spelled or (families is not None and family not in families):
        return f"{item.algorithm} ({item.source_keys[0] if item.source_keys else item.name})"
    unspelled = [r for r in item.tensors if r != "diff_b" and not _can_spell(lay, item.algorithm, r)]
    if unspelled:
        return f"{item.algorithm} tensors {unspelled} ({item.name})"
    if "diff_b" in item.tensors and "diff_b" not in spelled.get("full", {}):
        return f"a LoRA with a bias diff ({item.name})"
    if item.dora is not None and not item.dora.on_out and "dora_scale" not in spelled.get("dora", {}):
        return f"a DoRA magnitude per input column ({item.name})"
    return None


def _holds(lay: Layout, families: tuple[str, ...] | None = None) -> str:
    """'LoRA and DoRA only (PEFT keys lora_A/lora_B)': the families a layout spells, for refusals."""
    names = {a.family: a.title or a.name for a in reversed(algorithms.by_priority())}
    kept = [a for a in lay.algorithms if families is None or a in families]
    held = [names.get(a, a) for a in kept] + (["DoRA"] if "dora" in lay.suffixes else [])
    text = " and ".join(held) + (" only" if len(kept) == 1 else "")
    if lay.suffixes.get("lora") == PEFT_LORA:
        text += " (PEFT keys lora_A/lora_B)"
    return text


def _elsewhere(item: Item) -> str:
    """Which of the writable file layouts hold `item`'s algorithm, for a refusal."""
    family = algorithms.get(item.algorithm).family
    family_name = "LoKr, LoHa and full diffs" if family in ("lokr", "loha", "full") else "it"
    # Named as `convert --to` spells them (tools/targets.py: kohya writes the kohya row, comfyui the comfy row).
    held = [n for n, row in (("kohya", "kohya"), ("comfyui", "comfy")) if family in LAYOUTS[row].suffixes]
    if held:
        keep = "keeps" if len(held) == 1 else "keep"
        return f"Convert to {' or '.join(repr(n) for n in held)}, which {keep} {family_name}."
    return "No layout this tool writes keeps it."


def state_dict(items: list[Item], name: str, where: str = "adapter", *, shown: str | None = None,
               families: tuple[str, ...] | None = None,
               reasons: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, object] | None]:
    """(tensors, safetensors metadata, PEFT config or None) of `items` written in layout `name`.

    `shown` is the name the user asked for (a `convert --to` target), `families` the algorithm
    families that target may hold, `reasons` why a family is refused there (family -> reason)."""
    lay = layout(name)
    for item in items:
        problem = refusal(lay, item, families)
        if problem:
            why = (reasons or {}).get(algorithms.get(item.algorithm).family)
            raise UnsupportedError(
                f"{where}: --to {shown or name} holds {_holds(lay, families)}, but the adapter has {problem}"
                f"{f' ({why})' if why else ''}. {_elsewhere(item)}"
            )
    if lay.fused_qkv:
        items = fuse_qkv_items(items)
    sd: dict[str, torch.Tensor] = {}
    for item in items:
        _put(sd, lay, item)
    metadata = dict(lay.metadata)
    config = peft_config(items) if lay.alpha in ("metadata", "config") else None
    if lay.alpha == "metadata":
        metadata["lora_adapter_metadata"] = json.dumps(config)
        return sd, metadata, None
    return sd, metadata, config


def _put(sd: dict[str, torch.Tensor], lay: Layout, item: Item) -> None:
    stem = module_stem(lay, item.name)
    tensors = dict(item.tensors)
    # A layout without an alpha means scale 1: the algorithm folds the scale into its factors.
    if lay.alpha == "folded" and item.alpha is not None:  # musubi-tuner: sqrt(alpha / rank) in each factor
        assert item.rank is not None  # an alpha is scale * rank
        tensors = algorithms.get(item.algorithm).fold_scale(tensors, item.alpha / item.rank, True)
    elif lay.alpha == "none" and item.scale != 1.0:
        tensors = algorithms.get(item.algorithm).fold_scale(tensors, item.scale, False)
    for role, v in tensors.items():
        sd[stem + suffix(lay, *_spelled(lay, item.algorithm, role))] = v.contiguous()
    if lay.alpha == "key" and item.alpha is not None:
        sd[stem + suffix(lay, "scale", "alpha")] = torch.tensor(float(item.alpha), dtype=torch.float32)
    if item.dora is not None:
        ((role, spelled),) = lay.suffixes["dora"].items()
        m = item.dora.magnitude
        if role == "magnitude":
            m = m.reshape(-1)
        else:
            m = m.reshape(-1, 1) if item.dora.on_out else m.reshape(1, -1)
        sd[stem + spelled] = m.contiguous()


def peft_config(items: list[Item]) -> dict[str, object]:
    """The PEFT `LoraConfig` of `items`: the most common rank and alpha, the others as patterns."""
    ranks = {i.name: i.rank for i in items}
    alphas = {i.name: _clean(i.alpha) for i in items}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "r": r0,
        "lora_alpha": a0,
        "rank_pattern": {n: r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != a0},
        "target_modules": sorted(ranks),
        "use_dora": any(i.dora is not None for i in items),
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def _clean(x: float | None) -> float | int | None:
    if x is None:
        return None
    return int(x) if float(x).is_integer() else float(x)


def save(items: list[Item], name: str, out: str | Path, *, where: str = "adapter",
         extra_metadata: dict[str, str] | None = None) -> Path:
    """Write `items` in layout `name` at `out` (a .safetensors file, or a folder for PEFT)."""
    return save_state_dict(*state_dict(items, name, where), layout(name), out, extra_metadata)


def save_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str], config: dict[str, object] | None,
                    lay: Layout, out: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    # Split q/k/v targets of a fused file share their down tensor: give each key its own storage.
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    out = Path(out)
    if lay.folder:
        out.mkdir(parents=True, exist_ok=True)
        # What the file records (combine's inputs, hashes, errors) goes in the tensors' file here too.
        save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt", **(extra_metadata or {})})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return out
    metadata = {**metadata, **(extra_metadata or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata=metadata or None)
    return out
