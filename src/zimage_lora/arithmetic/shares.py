"""One input adapter's share of one module, in fp32 and in the module's own rows: what combining adds.

A share keeps a LoRA as factors (up placed on the module's rows, scale folded into it) so sums of
LoRAs stay factored; every other algorithm becomes its dense delta through the same row-block merge
as the engine (`tools/target_math.merge_weight` on zeros), so LoKr, LoHa, full diffs and fused q/k/v
placements mean exactly what they mean when applied. Deltas that depend on the base weight (DoRA,
OFT, BOFT, GLoRA, IA3) are what merging them at strength 1 into the base adds (`base.py` reads the
weight; without one they are refused, naming the flag that gives it). The engine is linear in the
strength for every algorithm, so strength t of the input is t times that delta.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import algorithms
from ..adapter import Target
from ..keys.index import ModuleShape
from ..tools.target_math import merge_bias, merge_weight
from .base import BaseWeights, require


@dataclass
class Share:
    """Unscaled by the user's strength (combination methods weight it); the file's scale folded in."""

    ups: list[torch.Tensor] = field(default_factory=list)  # (out, r) each
    downs: list[torch.Tensor] = field(default_factory=list)  # (r, in) each
    dense: torch.Tensor | None = None  # (out, in), or (n,) for a norm's weight
    bias: torch.Tensor | None = None  # (out,)
    rank: int = 0  # the sum of the LoRA ranks in it
    source: str = ""  # the input file, for messages

    @property
    def factored(self) -> bool:
        """Only LoRA factors (or nothing) for the weight."""
        return self.dense is None

    @property
    def has_weight(self) -> bool:
        return self.dense is not None or bool(self.ups)

    def up(self) -> torch.Tensor:
        return torch.cat(self.ups, 1)

    def down(self) -> torch.Tensor:
        return torch.cat(self.downs, 0)

    def matrix(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole weight delta as one dense fp32 tensor of `shape`."""
        total = self.dense.clone() if self.dense is not None else torch.zeros(shape)
        if self.ups:
            total.addmm_(self.up(), self.down())
        return total


def weight_dependent(target: Target) -> str | None:
    """What makes `target`'s delta depend on the base weight ("DoRA", "OFT", ...), or None."""
    algo = algorithms.get(target.algorithm)
    if target.dora is None and not algo.needs_weight:
        return None
    return "DoRA" if target.dora is not None else (algo.title or algo.name)


def add_target(share: Share, target: Target, shape: ModuleShape, base: BaseWeights | None = None) -> None:
    """Add one target of an input (a module may get several: a fused copy beside split q/k/v)."""
    what = weight_dependent(target)
    if what is not None:
        w = require(base, share.source, target.label, what).weight(target.module, tuple(shape.shape))
        # fp64, so the base cancels without eating the delta's digits (one rounding to fp32 at the end).
        w64 = w.double()
        dense = merge_weight(w64.clone(), [(target, 1.0)]).sub_(w64).float()
        share.dense = dense if share.dense is None else share.dense + dense
    elif shape.is_linear and target.algorithm == "lora":
        out = shape.shape[0]
        parts = algorithms.get("lora").row_parts(target.tensors)
        placement = target.placement(out)
        up = parts["up"].new_zeros(out, parts["up"].shape[1])
        up[placement.lo:placement.hi] = placement.take(parts["up"]) * target.scale
        share.ups.append(up)
        share.downs.append(parts["down"])
        share.rank += up.shape[1]
    else:
        dense = merge_weight(torch.zeros(shape.shape), [(target, 1.0)])
        share.dense = dense if share.dense is None else share.dense + dense
    if "diff_b" in target.tensors:
        bias = merge_bias(torch.zeros(shape.shape[0]), [(target, 1.0)])
        share.bias = bias if share.bias is None else share.bias + bias


def weighted_sum(shares: list[tuple[Share, float]], shape: tuple[int, ...]) -> Share:
    """sum of strength * share, still factored where every part is."""
    out = Share()
    for share, s in shares:
        out.ups += [u * s for u in share.ups]
        out.downs += share.downs
        out.rank += share.rank
        if share.dense is not None:
            out.dense = share.dense * s if out.dense is None else out.dense.add_(share.dense, alpha=s)
        if share.bias is not None:
            out.bias = share.bias * s if out.bias is None else out.bias.add_(share.bias, alpha=s)
    return out
