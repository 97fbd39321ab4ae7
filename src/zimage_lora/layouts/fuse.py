"""q/k/v fusion for layouts that write the native fused `attention.qkv` (ComfyUI, musubi-tuner's
ComfyUI export): items on q, k and v of one block become one item where their algorithm fuses the
rows exactly (`Algorithm.fuse_rows`: LoRA, full diffs); DoRA and bias diffs are joined here.
"""

from __future__ import annotations

import torch

from .. import algorithms
from ..adapter import Dora
from ..keys.aliases import FUSED_QKV, qkv_block, qkv_names
from .item import Item


def fuse_qkv_items(items: list[Item]) -> list[Item]:
    """Items on q, k, v of one block become one item on `attention.qkv` where that is exact."""
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
    if len(algos) != 1:
        return None
    if any(d is not None for d in doras) and (len(present) < 3 or any(d is None or not d.on_out for d in doras)):
        return None
    if any("diff_b" in p.tensors for p in present) and len(present) < 3:
        return None
    ref = present[0]
    # The algorithm fuses its rows (Algorithm.fuse_rows; None: not exactly, keep them apart).
    rows = [None if p is None else ({r: v for r, v in p.tensors.items() if r != "diff_b"}, p.scale, p.rank)
            for p in parts]
    fused = algorithms.get(ref.algorithm).fuse_rows(rows)
    if fused is None:
        return None
    tensors, scale, rank = fused
    if all("diff_b" in p.tensors for p in present):
        tensors["diff_b"] = torch.cat([p.tensors["diff_b"] for p in present])
    dora = None
    if doras[0] is not None:  # then every block has one (checked above)
        dora = Dora(torch.cat([d.magnitude for d in doras if d is not None]), True)
    keys = tuple(k for p in present for k in p.source_keys)
    return Item(block + FUSED_QKV, ref.algorithm, tensors, scale, rank, dora, keys)
