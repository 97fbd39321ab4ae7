"""Best rank-k approximations of one module's delta, as LoRA factors (up (out, k), down (k, in)).

Three ways to the same truncated SVD, chosen by what the delta is given as:
- `from_factors`: a sum of LoRAs, up @ down with up (out, R), down (R, in). QR of up and of down.T
  reduce it to an R x R core whose SVD is the delta's (delta = Qu core Qd^T, Qu and Qd orthonormal),
  so the dense (out, in) delta is never built: O((out + in) R^2) instead of O(out in min(out, in)).
- `from_dense`: any delta as a matrix (LoKr, LoHa, full diffs, TIES/DARE results): `torch.linalg.svd`.
- `randomized`: a large dense difference (extract): `torch.svd_lowrank` (Halko et al.) with
  oversampling and power iterations; its error is measured on the residual itself.
The lost part is the sum of the dropped singular values squared where all of them are known (never
||D||^2 - ||kept||^2, which cancels to noise in fp32 when little is dropped).
The singular values are split evenly, up = U sqrt(S), down = sqrt(S) Vh, so neither factor holds the
whole range (kinder to a bf16 / fp16 file).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .ranks import RankRule, keep


@dataclass
class Truncated:
    up: torch.Tensor  # (out, k) fp32
    down: torch.Tensor  # (k, in) fp32
    total: float  # ||delta||_F^2
    lost: float  # ||delta - up @ down||_F^2

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def rel_error(self) -> float:
        return math.sqrt(self.lost / self.total) if self.total > 0 else 0.0


def squared_norm(t: torch.Tensor, chunk_bytes: int = 1 << 24) -> float:
    """The sum of squares in float64, 2M values at a time: a whole float64 copy of a 10240 x 3840 delta
    (and its square) would be ~630 MB of temporaries beside it on every module of an extract."""
    flat = t.reshape(-1)
    step = chunk_bytes // 8
    return float(sum(float(flat[i:i + step].double().square().sum()) for i in range(0, flat.numel(), step)))


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, total: float,
           lost: float | None = None) -> Truncated:
    root = s[:k].sqrt()
    lost = float((s[k:].double() ** 2).sum()) if lost is None else lost
    return Truncated((u[:, :k] * root).contiguous(), (root[:, None] * vh[:k]).contiguous(), total, lost)


def from_factors(up: torch.Tensor, down: torch.Tensor, rule: RankRule) -> Truncated:
    """Truncated SVD of up @ down (fp32), from the factors only."""
    up, down = up.float(), down.float()
    qu, ru = torch.linalg.qr(up)  # (out, m), (m, R)
    qd, rd = torch.linalg.qr(down.T)  # (in, p), (p, R)
    u, s, vh = torch.linalg.svd(ru @ rd.T, full_matrices=False)  # the (m, p) core
    total = float((s.double() ** 2).sum())
    k = keep(s, rule, min(up.shape[0], down.shape[1]))
    return _split(qu @ u[:, :k], s, vh[:k] @ qd.T, k, total)


def from_dense(delta: torch.Tensor, rule: RankRule) -> Truncated:
    """Truncated SVD of a dense fp32 delta (out, in)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    total = squared_norm(delta)
    return _split(u, s, vh, keep(s, rule, min(delta.shape)), total)


def randomized(delta: torch.Tensor, rule: RankRule, *, oversample: int = 10, niter: int = 2,
               seed: int = 0) -> Truncated:
    """Truncated SVD of a large fp32 delta by randomized subspace iteration.

    With `rule.rank` the subspace is rank + oversample wide. With an energy / fro rule and no rank the
    width starts at 64 and doubles until the found values hold the asked fraction of the (exact)
    squared norm, falling back to the exact SVD once the width reaches a quarter of min(out, in).
    """
    delta = delta.float()
    n = min(delta.shape)
    total = squared_norm(delta)
    if total == 0:
        return Truncated(delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0, delta.shape[1]), 0.0, 0.0)
    width = (rule.rank + oversample) if rule.rank is not None else 64
    devices = [delta.device] if delta.device.type != "cpu" else []
    while True:
        if 4 * width >= n:
            return from_dense(delta, rule)
        with torch.random.fork_rng(devices=devices):  # reproducible, and the caller's RNG left alone
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(delta, q=width, niter=niter)
        k = keep(s, rule, n, total)
        if _final(rule, s, k, total):
            residual = torch.addmm(delta, u[:, :k] * s[:k], v[:, :k].T, alpha=-1)  # one (out, in) temporary
            return _split(u, s, v.T, k, total, squared_norm(residual))
        width *= 2


def _final(rule: RankRule, s: torch.Tensor, k: int, total: float) -> bool:
    """Whether the values found so far decide the rule's choice."""
    if rule.rank is not None:
        return True
    seen = float((s.double() ** 2).sum()) / total
    if rule.energy is not None:
        return seen >= rule.energy
    if rule.fro is not None:
        return seen >= rule.fro**2
    if rule.ratio is not None:
        return k < int((s > 0).sum())  # a value below the threshold was found: the rest are smaller
    return False  # cumulative needs the sum of every value: widen to the exact SVD
