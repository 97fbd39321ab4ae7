"""Row blocks of a target's delta, added into an fp32 block of the weight in place.

Merging works on a few hundred rows at a time so the extra memory stays far below one fp32 copy of
the layer. The row-block math of each algorithm lives in `algorithms` (`row_parts`, `delta_block`,
`add_rows`); the rows arithmetic in `Placement`.
"""

from __future__ import annotations

import torch

from .. import algorithms
from ..adapter import Target
from ..algorithms.dora import dora_merged
from ..fp32 import fits_fp32


class MergeFactors:
    """A target's factors cast to fp32 once per merge, with its row placement in the module."""

    def __init__(self, target: Target, out_features: int, device: torch.device | None = None) -> None:
        self.target = target
        # Factors live on the CPU after loading; the weight may be on an accelerator.
        self.device = device
        self.placement = target.placement(out_features)
        self.algorithm = algorithms.get(target.algorithm)
        self.parts: dict[str, torch.Tensor] = self.algorithm.row_parts(target.tensors)
        if device is not None:
            self.parts = {k: v.to(device) for k, v in self.parts.items()}

    @property
    def has_weight_delta(self) -> bool:
        return bool(self.parts)

    @property
    def row_align(self) -> int:
        """Merged row blocks start at multiples of this (in delta rows); 1 for most algorithms."""
        return self.algorithm.row_align(self.parts)

    def block(self, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [lo, hi) of the full fp32 delta (delta coordinates), unscaled; `weight`: the matching
        fp32 weight rows, read by algorithms that need it."""
        return self.algorithm.delta_block(self.parts, lo, hi, weight=weight if self.algorithm.needs_weight else None)

    def add_into(self, chunk: torch.Tensor, r0: int, strength: float) -> None:
        """chunk (rows r0 .. r0+len of the module, fp32) += scale * strength * matching delta rows."""
        alpha = self.target.scale * strength
        if fits_fp32(alpha):
            algorithms.add_rows_(chunk, r0, self.target.algorithm, self.parts, self.placement, alpha)
            return
        # Each factor is within float32's range, their product is not (torch refuses such an alpha):
        # the delta at its scale, then times the strength. What overflows lands as Inf, which the
        # caller's overflow check refuses with the usual message.
        part = torch.zeros_like(chunk)
        algorithms.add_rows_(part, r0, self.target.algorithm, self.parts, self.placement, self.target.scale)
        chunk.add_(part, alpha=strength)

    def dora_into(self, chunk: torch.Tensor, r0: int, strength: float) -> None:
        """DoRA per output row: rows += t * (f * (W + s dW) - W), f = m / ||W + s dW||."""
        met = self.placement.clip(r0, r0 + chunk.shape[0])
        if met is None:
            return
        lo, hi, d_lo, d_hi = met
        view = chunk[lo - r0 : hi - r0]
        assert self.target.dora is not None  # called for DoRA targets only
        mag = self.placement.local(self.target.dora.magnitude.float(), lo, hi).to(view.device)
        merged = dora_merged(view, self.target.scale * self.block(d_lo, d_hi, view), mag, strength, True)
        view.copy_(merged)

    def dora_whole(self, weight: torch.Tensor, strength: float) -> None:
        """DoRA with the magnitude per input column: needs every row at once."""
        p = self.placement
        view = weight[p.lo : p.hi]
        dw = self.block(*p.delta_span, view)
        d = self.target.dora
        assert d is not None  # called for DoRA targets only
        view.copy_(dora_merged(view, self.target.scale * dw, d.magnitude.to(view.device), strength, d.on_out))

    def bias_delta(self) -> tuple[int, int, torch.Tensor] | None:
        """(module row lo, hi, fp32 bias diff for those rows) or None."""
        db = self.target.tensors.get("diff_b")
        if db is None:
            return None
        p = self.placement
        return p.lo, p.hi, p.take(db.float().reshape(-1)).to(self.device)


def add_rows(chunk: torch.Tensor, r0: int, weighted: list[tuple[MergeFactors, float]]) -> None:
    """fp32 `chunk` (module rows r0 .. r0+len) += every (prepared target, strength), DoRA included."""
    for p, s in weighted:
        d = p.target.dora
        if d is None:
            p.add_into(chunk, r0, s)
        elif d.on_out:
            p.dora_into(chunk, r0, s)
        else:
            p.dora_whole(chunk, s)


def add_scaled_(out: torch.Tensor, t: torch.Tensor, scale: float, strength: float) -> None:
    """out += scale * strength * t (fp32), also when the product of the two is past float32's range
    (then it overflows into Inf, for the caller's overflow check, instead of torch refusing the alpha)."""
    alpha = scale * strength
    if fits_fp32(alpha):
        out.add_(t, alpha=alpha)
    else:
        out.add_(t * scale, alpha=strength)
