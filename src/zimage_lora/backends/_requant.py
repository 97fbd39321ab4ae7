"""Requantizing a merged weight block by block while keeping the stored scales wherever they still fit.

A quantizer that picks fresh scales for `W + dW` rounds the base weight again: the merged block's new
grid is not the one `W` sat on exactly, so a small delta is lost in the new rounding noise (a 4-bit
merge then moves the weight by more than the adapter did). With the stored scale of a block, `W` is
exactly on the grid and only `dW` is rounded. Each block is therefore encoded twice, with its stored
scale and with a freshly picked one, and keeps whichever decodes closer to `W + dW`: never worse than a
fresh requantization. Where the merged block still fits its stored range, the stored scale almost
always wins; where it overflows, clamping costs more and the block is re-picked.
"""

from __future__ import annotations

import torch


def uniform_codes(v: torch.Tensor, d: torch.Tensor, m: torch.Tensor | float, lo: int, hi: int) -> torch.Tensor:
    """Codes q = round((v - m) / d), clamped to [lo, hi], for blocks `v` (nb, bs) with per-block `d`, `m`
    (nb, 1). A zero scale gives code 0 (the block decodes to m)."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.where(d == 0, torch.zeros_like(v), torch.round((v - m) / safe))
    return q.clamp(lo, hi)


def keep_stored(target: torch.Tensor, stored: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """Per block (rows of `target`, (nb, bs)): True where the decode with the stored scales, `stored`, is
    at least as close to `target` as the decode with fresh ones, `fresh`. A merged block that overflows
    its stored range is clamped there, and loses to the fresh scales unless the overflow is tiny."""
    err_stored = (stored - target).square().sum(dim=1)
    err_fresh = (fresh - target).square().sum(dim=1)
    return err_stored <= err_fresh
