"""How many singular values a truncation keeps, per module: the one home of the rank rules.

`rank` keeps at most R; `energy` keeps the fewest that hold fraction E of the squared Frobenius norm
(so the relative error is at most sqrt(1 - E)). `fro`, `ratio` and `cumulative` are the dynamic rules
of kohya sd-scripts' `networks/resize_lora.py` (`sv_fro`, `sv_ratio`, `sv_cumulative`), with its
bounds: at least 1 and at most len(S) - 1 singular values, then capped by `rank` when both are given
(kohya's `--new_rank` is the hard limit of its dynamic methods).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class RankRule:
    rank: int | None = None
    energy: float | None = None
    fro: float | None = None
    ratio: float | None = None
    cumulative: float | None = None

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.rank, self.energy, self.fro, self.ratio, self.cumulative))

    def describe(self) -> str:
        parts = [f"{k}={v:g}" for k, v in self.as_dict().items()]
        return ", ".join(parts) or "exact"

    def as_dict(self) -> dict[str, float]:
        names = ("rank", "energy", "fro", "ratio", "cumulative")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def rule(rank: int | None = None, energy: float | None = None, fro: float | None = None, ratio: float | None = None,
         cumulative: float | None = None) -> RankRule:
    """A checked `RankRule`: one of energy / fro / ratio / cumulative at most, rank optional beside it."""
    dynamic = {n: v for n, v in (("energy", energy), ("fro", fro), ("ratio", ratio), ("cumulative", cumulative))
               if v is not None}
    if len(dynamic) > 1:
        raise InvalidArgumentError(f"give one of --energy, --fro, --ratio, --cumulative, not {' and '.join(dynamic)}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InvalidArgumentError(f"rank must be a whole number >= 1, got {rank!r}.")
    for name, value in dynamic.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise InvalidArgumentError(f"--{name} must be a number, got {value!r}.")
        low_ok = value >= 1 if name == "ratio" else value > 0
        if not low_ok or (name != "ratio" and value > 1):
            where = "at least 1 (largest / smallest kept singular value)" if name == "ratio" else "in (0, 1]"
            raise InvalidArgumentError(f"--{name} must be {where}, got {value!r}.")
    return RankRule(rank, *(float(v) if v is not None else None for v in (energy, fro, ratio, cumulative)))


def keep(s: torch.Tensor, r: RankRule, length: int | None = None, total: float | None = None) -> int:
    """How many of the singular values `s` (descending) `r` keeps; 0 when they are all 0. `length`: how
    many the dense delta has, min(out, in) (kohya's upper bound; the factor path sees only the nonzero
    ones). `total`: the delta's squared norm when `s` are only its largest values (randomized SVD)."""
    n = int((s > 0).sum())
    length = max(length or n, n)
    if n == 0:
        return 0
    s = s.double()[:n]
    total = total if total is not None else float((s * s).sum())
    k = n
    if r.energy is not None:
        frac = torch.cumsum(s * s, 0) / total
        # fewest values reaching E; the 1e-12 forgives fp rounding of a sum that should be exactly E
        k = min(n, int(torch.searchsorted(frac, torch.tensor(r.energy - 1e-12, dtype=frac.dtype))) + 1)
    elif r.fro is not None:
        frac = torch.cumsum(s * s, 0) / total
        k = _kohya_bounds(int(torch.searchsorted(frac, torch.tensor(r.fro**2, dtype=frac.dtype))) + 1, n, length)
    elif r.cumulative is not None:
        frac = torch.cumsum(s, 0) / float(s.sum())
        k = _kohya_bounds(int(torch.searchsorted(frac, torch.tensor(r.cumulative, dtype=frac.dtype))) + 1, n, length)
    elif r.ratio is not None:
        k = _kohya_bounds(int((s > s[0] / r.ratio).sum()), n, length)
    if r.rank is not None:
        k = min(k, r.rank)
    return k


def _kohya_bounds(index: int, n: int, length: int) -> int:
    # resize_lora.py clamps every dynamic index to [1, len(S) - 1] of the dense delta's spectrum; never
    # more than the nonzero values.
    return min(n, max(1, min(index, length - 1)))
