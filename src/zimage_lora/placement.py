"""Where a delta lands in a module: the one home of the rows arithmetic.

A target covers module output rows [lo, hi) (all of them, or one of q/k/v on a fused qkv Linear) and
takes them from delta rows [d0, d0 + n) (all of its delta, or one block of a fused qkv delta on a split
to_q/to_k/to_v). Module rows and delta rows differ by a constant offset, `d0 - lo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    lo: int  # first module row
    hi: int  # one past the last module row
    d0: int  # the delta row that lands on module row `lo`
    out_features: int  # the module's rows

    @classmethod
    def of(cls, rows: tuple[int, int] | None, delta_rows: tuple[int, int] | None, out_features: int) -> Placement:
        lo, hi = cls.module_rows(rows, out_features)
        return cls(lo, hi, delta_rows[0] if delta_rows is not None else 0, out_features)

    @staticmethod
    def module_rows(rows: tuple[int, int] | None, out_features: int) -> tuple[int, int]:
        """The module rows a target's `rows` cover (all of them for None)."""
        lo, hi = rows if rows is not None else (0, out_features)
        return lo, hi

    @property
    def n(self) -> int:
        return self.hi - self.lo

    @property
    def rows(self) -> tuple[int, int]:
        return self.lo, self.hi

    @property
    def delta_span(self) -> tuple[int, int]:
        """(first, one past last) delta row kept."""
        return self.d0, self.d0 + self.n

    @property
    def whole(self) -> bool:
        """Every row of the module (an input transform touches all of them, so it needs this)."""
        return self.lo == 0 and self.hi == self.out_features

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The kept delta rows of a row-indexed tensor (a delta, a bias diff, LoRA's up)."""
        return t[self.d0 : self.d0 + self.n]

    def local(self, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Module rows [lo, hi) (within this placement) of a tensor indexed from its first row: a taken
        delta, a DoRA magnitude per output row."""
        return t[lo - self.lo : hi - self.lo]

    def clip(self, r0: int, r1: int) -> tuple[int, int, int, int] | None:
        """Module rows [r0, r1) met with this placement: (module lo, hi, delta lo, hi), or None when apart."""
        lo, hi = max(r0, self.lo), min(r1, self.hi)
        if lo >= hi:
            return None
        shift = self.d0 - self.lo
        return lo, hi, lo + shift, hi + shift
