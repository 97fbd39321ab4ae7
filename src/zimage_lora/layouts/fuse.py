"""q/k/v fusion for layouts that write the native fused `attention.qkv` (ComfyUI, musubi-tuner's
ComfyUI export): LoRA and diff items on q, k and v of one block become one item where that is exact.

One shared down when q, k, v have the same down and scale (rank r); otherwise the downs stacked and
each up in its own row and column block (block-diagonal, rank = the sum of the ranks), with
different scales folded into the ups in fp32.
"""

from __future__ import annotations

import torch

from ..adapter import Dora
from ..keys.aliases import FUSED_QKV, qkv_block, qkv_names
from .item import Item


def fuse_qkv_items(items: list[Item]) -> list[Item]:
    """LoRA and diff items on q, k, v of one block become one item on `attention.qkv` when exact."""
    by_name = {i.name: i for i in items}
    out: list[Item] = []
    done: set[str] = set()
    for item in items:
        if item.name in done:
            continue
        block = qkv_block(item.name)
        if block is None:
            out.append(item)
            continue
        parts = [by_name.get(n) for n in qkv_names(block)]
        fused = _fuse_qkv(block, parts)
        if fused is None:
            out.append(item)
            continue
        out.append(fused)
        done.update(p.name for p in parts if p is not None)
    return out


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
    return Item(block + FUSED_QKV, ref.algorithm, tensors, scale, rank, dora, keys)


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
