"""Rewrite an adapter into another file layout: diffusers, kohya, ComfyUI (fused qkv) or a PEFT folder.

The adapter is first read into the canonical form (resolved against a Z-Image module inventory),
then written from it: nothing depends on the source layout. LoRA converts exactly (alpha carried
as alpha, never folded unless q/k/v with different scales must share one fused alpha); what a
target layout cannot hold (LoKr in PEFT keys, a norm diff in diffusers keys) is refused with the
reason and the layouts that can hold it.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter import Adapter, Dora, Target
from ..algorithms._shapes import as_matrix
from ..errors import LoRAError, UnsupportedError
from ..keys.aliases import SPLIT_QKV, native_name
from ..sources import LoRAConfiguration

FORMATS = ("diffusers", "kohya", "comfy", "peft")
FUSED = "attention.qkv"
_FACTOR_SUFFIX = {"lokr": "lokr_", "loha": "hada_"}
_LORA_SUFFIXES = {"kohya": (".lora_down.weight", ".lora_up.weight"), "comfy": (".lora_A.weight", ".lora_B.weight")}


@dataclass
class Item:
    """One module's adapter in diffusers naming. `name` ends in `attention.qkv` for a delta that
    covers q, k and v together (a fused LoKr / LoHa / diff that cannot be split exactly)."""

    name: str
    algorithm: str
    tensors: dict[str, torch.Tensor]
    scale: float = 1.0
    rank: int | None = None
    dora: Dora | None = None
    source_keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def alpha(self) -> float | None:
        return None if self.rank is None else self.scale * self.rank


def convert_adapter(
    source: str | Path | LoRAConfiguration | Adapter,
    to: str,
    out: str | Path,
    *,
    model: str | Path | torch.nn.Module | None = None,
    overwrite: bool = False,
) -> Path:
    """Read `source`, write it in layout `to` at `out` (a .safetensors file; a folder for "peft")."""
    if to not in FORMATS:
        raise LoRAError(f"unknown target layout {to!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    if out.exists() and not overwrite:
        raise LoRAError(f"{out} already exists; choose another --out or pass --overwrite.")
    adapter = source if isinstance(source, Adapter) else _load(source, model)
    items = canonical_items(adapter)
    sd, metadata, config = build_state_dict(items, to, where=adapter.source)
    metadata["zimage_lora_converted_from"] = adapter.format
    # Split q/k/v targets of a fused file share their down tensor: give each key its own storage.
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    if to == "peft":
        out.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return out
    if out.suffix != ".safetensors":
        raise LoRAError(f"{out}: the output of --to {to} is one file; give a name ending in .safetensors.")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata=metadata)
    return out


def _load(source, model) -> Adapter:
    from ..inventory import inventory_model, load_config
    from ..loading import load_adapter

    if isinstance(model, torch.nn.Module):
        return load_adapter(source, model)
    return load_adapter(source, inventory_model(load_config(model)))


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
    tensors = dict(t.tensors)
    if t.algorithm == "lora" and "mid" in tensors:  # fold a LoCon mid into down: exact in fp32
        mid = tensors.pop("mid")
        down = tensors["down"]
        tensors["down"] = as_matrix(mid).float() @ as_matrix(down).float()
    tensors = {role: as_matrix(v) for role, v in tensors.items()}
    if t.algorithm == "lokr" and "w1" in tensors and "w2" in tensors and t.scale != 1.0:
        # Written layouts give full LoKr factors scale 1 (LyCORIS rule); a trainer rule with another
        # scale (musubi-tuner: alpha / max(w2 shape)) is folded into w2, exactly, in fp32.
        tensors["w2"] = tensors["w2"].float() * t.scale
        return Item(t.module, t.algorithm, tensors, 1.0, None, t.dora, t.source_keys)
    rank = t.rank
    if rank is None and t.algorithm == "lora":
        rank = tensors["down"].shape[0]
    return Item(t.module, t.algorithm, tensors, t.scale, rank, t.dora, t.source_keys)


def _fused_item(adapter: Adapter, parts: list[Target]) -> Item:
    block = parts[0].module[: -len(SPLIT_QKV[0])] if parts[0].module.endswith(SPLIT_QKV[0]) else None
    expected = [block + p for p in SPLIT_QKV] if block is not None else []
    if [p.module for p in parts] != expected or parts[0].delta_rows[0] != 0:
        raise UnsupportedError(
            f"{adapter.source}: a fused delta ({parts[0].source_keys[0]}) lands on {[p.label for p in parts]}; "
            "only a whole q/k/v block can be written back."
        )
    first = _item(parts[0])
    dora = None
    if parts[0].dora is not None:
        if not parts[0].dora.on_out:
            dora = parts[0].dora
        else:
            dora = Dora(torch.cat([p.dora.magnitude for p in parts]), on_out=True)
    return Item(block + FUSED, first.algorithm, first.tensors, first.scale, first.rank, dora, first.source_keys)


# --- layouts -----------------------------------------------------------------------------------------

def build_state_dict(items: list[Item], to: str, where: str = "adapter") -> tuple[dict, dict, dict | None]:
    """(tensors, safetensors metadata, PEFT config or None) of `items` in layout `to`."""
    if to in ("diffusers", "peft"):
        return _peft_like(items, to, where)
    if to == "kohya":
        sd: dict[str, torch.Tensor] = {}
        for item in items:
            _put_lycoris_style(sd, "lora_unet_" + item.name.replace(".", "_"), item, "kohya")
        return sd, {}, None
    sd = {}
    for item in _fuse_for_comfy(items):
        _put_lycoris_style(sd, "diffusion_model." + native_name(item.name), item, "comfy")
    return sd, {}, None


def _put_lycoris_style(sd: dict, stem: str, item: Item, layout: str) -> None:
    t = item.tensors
    if item.algorithm == "lora":
        down, up = _LORA_SUFFIXES[layout]
        sd[stem + down] = t["down"].contiguous()
        sd[stem + up] = t["up"].contiguous()
    elif item.algorithm in _FACTOR_SUFFIX:
        for role, v in t.items():
            if role != "diff_b":
                sd[f"{stem}.{_FACTOR_SUFFIX[item.algorithm]}{role}"] = v.contiguous()
    elif "diff" in t:
        sd[stem + ".diff"] = t["diff"].contiguous()
    if "diff_b" in t:
        sd[stem + ".diff_b"] = t["diff_b"].contiguous()
    if item.alpha is not None:
        sd[stem + ".alpha"] = torch.tensor(float(item.alpha), dtype=torch.float32)
    if item.dora is not None:
        m = item.dora.magnitude
        sd[stem + ".dora_scale"] = (m.reshape(-1, 1) if item.dora.on_out else m.reshape(1, -1)).contiguous()


def _peft_like(items: list[Item], to: str, where: str) -> tuple[dict, dict, dict | None]:
    sd: dict[str, torch.Tensor] = {}
    prefix = "transformer." if to == "diffusers" else "base_model.model."
    for item in items:
        problem = None
        if item.algorithm != "lora":
            problem = f"{item.algorithm} ({item.source_keys[0] if item.source_keys else item.name})"
        elif "diff_b" in item.tensors:
            problem = f"a LoRA with a bias diff ({item.name})"
        elif item.dora is not None and not item.dora.on_out:
            problem = f"a DoRA magnitude per input column ({item.name})"
        if problem:
            raise UnsupportedError(
                f"{where}: --to {to} holds LoRA and DoRA only (PEFT keys lora_A/lora_B), but the adapter has "
                f"{problem}. Convert to 'kohya' or 'comfy', which keep LoKr, LoHa and full diffs."
            )
        sd[f"{prefix}{item.name}.lora_A.weight"] = item.tensors["down"].contiguous()
        sd[f"{prefix}{item.name}.lora_B.weight"] = item.tensors["up"].contiguous()
        if item.dora is not None:
            sd[f"{prefix}{item.name}.lora_magnitude_vector"] = item.dora.magnitude.reshape(-1).contiguous()
    config = _peft_config(items)
    if to == "diffusers":
        return sd, {"lora_adapter_metadata": json.dumps(config), "format": "pt"}, None
    return sd, {}, config


def _peft_config(items: list[Item]) -> dict:
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


# --- ComfyUI q/k/v fusion -----------------------------------------------------------------------------

def _fuse_for_comfy(items: list[Item]) -> list[Item]:
    """LoRA and diff items on q, k, v of one block become one item on `attention.qkv` when exact."""
    by_name = {i.name: i for i in items}
    out: list[Item] = []
    done: set[str] = set()
    for item in items:
        if item.name in done:
            continue
        block = _qkv_block(item.name)
        if block is None:
            out.append(item)
            continue
        parts = [by_name.get(block + p) for p in SPLIT_QKV]
        fused = _fuse_qkv(block, parts)
        if fused is None:
            out.append(item)
            continue
        out.append(fused)
        done.update(p.name for p in parts if p is not None)
    return out


def _qkv_block(name: str) -> str | None:
    for p in SPLIT_QKV:
        if name.endswith(p):
            return name[: -len(p)]
    return None


def _fuse_qkv(block: str, parts: list[Item | None]) -> Item | None:
    present = [p for p in parts if p is not None]
    algos = {p.algorithm for p in present}
    doras = [p.dora for p in present]
    if len(algos) != 1 or algos - {"lora", "full"}:
        return None
    if any(d is not None for d in doras) and (len(present) < 3 or any(d is None or not d.on_out for d in doras)):
        return None
    if any("diff_b" in p.tensors for p in present) and len(present) < 3:
        return None
    ref = present[0]
    out_rows = [p.tensors["up" if ref.algorithm == "lora" else "diff"].shape[0] for p in present]
    d = out_rows[0]
    if ref.algorithm == "full":
        if any("diff" not in p.tensors for p in present):
            return None
        diffs = [p.tensors["diff"] if p is not None else torch.zeros_like(ref.tensors["diff"]) for p in parts]
        tensors = {"diff": torch.cat(diffs, 0)}
        scale, rank = 1.0, None
    else:
        tensors, scale, rank = _fuse_lora(parts, d)
    if all("diff_b" in p.tensors for p in present):
        tensors["diff_b"] = torch.cat([p.tensors["diff_b"] for p in present])
    dora = Dora(torch.cat([p.dora.magnitude for p in present]), True) if doras[0] is not None else None
    keys = tuple(k for p in present for k in p.source_keys)
    return Item(block + FUSED, ref.algorithm, tensors, scale, rank, dora, keys)


def _fuse_lora(parts: list[Item | None], d: int) -> tuple[dict, float, int]:
    present = [p for p in parts if p is not None]
    ref = present[0]
    same_down = all(
        p.tensors["down"].shape == ref.tensors["down"].shape and torch.equal(p.tensors["down"], ref.tensors["down"])
        for p in present
    )
    same_scale = all(p.scale == ref.scale for p in present)
    if same_down and same_scale:  # one shared down: the natural fused form, rank r
        r = ref.tensors["down"].shape[0]
        ups = [p.tensors["up"] if p is not None else ref.tensors["up"].new_zeros(d, r) for p in parts]
        return {"down": ref.tensors["down"], "up": torch.cat(ups, 0)}, ref.scale, ref.rank
    # Block-diagonal: downs stacked, each up in its own row and column block (rank = sum of ranks).
    ranks = [p.tensors["down"].shape[0] for p in present]
    total = sum(ranks)
    fold = not same_scale
    dtype = torch.float32 if fold else torch.promote_types(ref.tensors["up"].dtype, ref.tensors["down"].dtype)
    down = torch.cat([p.tensors["down"].to(dtype) for p in present], 0)
    up = torch.zeros(3 * d, total, dtype=dtype)
    col = 0
    for i, p in enumerate(parts):
        if p is None:
            continue
        r = p.tensors["down"].shape[0]
        block = p.tensors["up"].to(dtype)
        up[i * d:(i + 1) * d, col:col + r] = block * p.scale if fold else block
        col += r
    scale = 1.0 if fold else ref.scale
    return {"down": down, "up": up}, scale, total


def describe(items: list[Item]) -> dict[str, int]:
    return dict(Counter(i.algorithm for i in items))


__all__ = ["FORMATS", "convert_adapter", "canonical_items", "build_state_dict"]
