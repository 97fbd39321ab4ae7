"""Row blocks of a target's delta, added into an fp32 block of the weight in place.

Merging works on a few hundred rows at a time so the extra memory stays far below one fp32 copy of
the layer. The row-block math of each algorithm lives in `algorithms` (`row_parts`, `delta_block`).
"""

from __future__ import annotations

import torch

from .. import algorithms
from ..adapter import Target
from ..algorithms.dora import dora_merged


class Prepared:
    """A target's factors cast to fp32 once per merge, with its row placement in the module."""

    def __init__(self, target: Target, out_features: int, device: torch.device | None = None) -> None:
        self.target = target
        # Factors live on the CPU after loading; the weight may be on an accelerator.
        self.device = device
        self.mod_lo, self.mod_hi = target.rows if target.rows is not None else (0, out_features)
        self.d0 = target.delta_rows[0] if target.delta_rows is not None else 0
        self.parts: dict[str, torch.Tensor] = algorithms.get(target.algorithm).row_parts(target.tensors)
        if device is not None:
            self.parts = {k: v.to(device) for k, v in self.parts.items()}

    @property
    def has_weight_delta(self) -> bool:
        return bool(self.parts)

    def block(self, lo: int, hi: int) -> torch.Tensor:
        """Rows [lo, hi) of the full fp32 delta (delta coordinates), unscaled."""
        return algorithms.get(self.target.algorithm).delta_block(self.parts, lo, hi)

    def add_into(self, chunk: torch.Tensor, r0: int, alpha: float) -> None:
        """chunk (rows r0 .. r0+len of the module, fp32) += alpha * matching delta rows."""
        lo, hi = max(r0, self.mod_lo), min(r0 + chunk.shape[0], self.mod_hi)
        if lo >= hi:
            return
        d_lo, d_hi = lo - self.mod_lo + self.d0, hi - self.mod_lo + self.d0
        view = chunk[lo - r0 : hi - r0]
        if self.target.algorithm == "lora":
            view.addmm_(self.parts["up"][d_lo:d_hi], self.parts["down"], alpha=alpha)
        else:
            view.add_(self.block(d_lo, d_hi), alpha=alpha)

    def dora_into(self, chunk: torch.Tensor, r0: int, strength: float) -> None:
        """DoRA per output row: rows += t * (f * (W + s dW) - W), f = m / ||W + s dW||."""
        lo, hi = max(r0, self.mod_lo), min(r0 + chunk.shape[0], self.mod_hi)
        if lo >= hi:
            return
        d_lo, d_hi = lo - self.mod_lo + self.d0, hi - self.mod_lo + self.d0
        view = chunk[lo - r0 : hi - r0]
        mag = self.target.dora.magnitude.float()[lo - self.mod_lo : hi - self.mod_lo].to(view.device)
        merged = dora_merged(view, self.target.scale * self.block(d_lo, d_hi), mag, strength, True)
        view.copy_(merged)

    def dora_whole(self, weight: torch.Tensor, strength: float) -> None:
        """DoRA with the magnitude per input column: needs every row at once."""
        view = weight[self.mod_lo : self.mod_hi]
        n = self.mod_hi - self.mod_lo
        dw = self.block(self.d0, self.d0 + n)
        d = self.target.dora
        view.copy_(dora_merged(view, self.target.scale * dw, d.magnitude.to(view.device), strength, d.on_out))

    def bias_delta(self) -> tuple[int, int, torch.Tensor] | None:
        """(module row lo, hi, fp32 bias diff for those rows) or None."""
        db = self.target.tensors.get("diff_b")
        if db is None:
            return None
        n = self.mod_hi - self.mod_lo
        db = db.float().reshape(-1)[self.d0 : self.d0 + n].to(self.device)
        return self.mod_lo, self.mod_hi, db


def add_rows(chunk: torch.Tensor, r0: int, weighted: list[tuple[Prepared, float]]) -> None:
    """fp32 `chunk` (module rows r0 .. r0+len) += every (prepared target, strength), DoRA included."""
    for p, s in weighted:
        d = p.target.dora
        if d is None:
            p.add_into(chunk, r0, p.target.scale * s)
        elif d.on_out:
            p.dora_into(chunk, r0, s)
        else:
            p.dora_whole(chunk, s)
