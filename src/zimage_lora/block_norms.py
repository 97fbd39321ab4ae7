"""Where an adapter acts: the Frobenius norm of its scaled delta per block (`inspect --blocks`), so a
user can see which blocks a per-block strength should turn up or down."""

from __future__ import annotations

import math

import torch

from . import algorithms
from .adapter import Adapter
from .blocks import block_key, block_of


def block_norms(adapter: Adapter) -> dict[str, float | None]:
    """Per block (`blocks.block_of`, in the order the model runs them): sqrt of the summed squared norms of
    scale * delta over its targets; None for a block whose delta needs the base weight (OFT, GLoRA...)."""
    squares: dict[str, float | None] = {}
    for t in adapter.targets:
        block = block_of(t.module)
        if algorithms.get(t.algorithm).needs_weight or any(v.is_meta for v in t.tensors.values()):
            squares[block] = None
            continue
        with torch.no_grad():
            d = algorithms.delta(t.algorithm, {k: v.float() for k, v in t.tensors.items()})
            sq = float(torch.linalg.vector_norm(d).square()) * t.scale**2
        so_far = squares.get(block, 0.0)
        if so_far is not None:
            squares[block] = so_far + sq
    return {b: None if (s := squares[b]) is None else math.sqrt(s) for b in sorted(squares, key=block_key)}
