"""What an apply did: modules and row slices touched, keys left out and why, requantization loss."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..adapter import Unmatched


@dataclass
class ApplyReport:
    """The outcome of `apply_adapter`.

    `applied`: module names that received a delta (with `[a:b]` when only rows a:b of a fused layer
    did). `unmatched`: file keys not applied, with reasons. `requant_loss`: for quantized layers merged
    in place, ||deq(Q(W + dW)) - (W + dW)|| / ||dW|| per module (0 is lossless; above 0.1 the merge lost
    a real part of the adapter and dynamic mode is the better choice). `replaced`: an adapter of this
    name was attached and this one took its place. `hotswapped`: it did so by copying values into the
    existing tensors (same shapes). `renamed_from`: the name derived from the source (its file stem)
    was taken by an adapter from another source, so this one got `name` instead. Both are also notes.
    """

    name: str
    mode: str
    scale: float
    source: str = ""
    format: str = ""
    applied: list[str] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    requant_loss: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    replaced: bool = False
    hotswapped: bool = False
    renamed_from: str | None = None

    @property
    def modules(self) -> list[str]:
        """Applied module names without row slices, in order, without repeats."""
        return list(dict.fromkeys(a.split("[", 1)[0] for a in self.applied))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # JSON-ready: Unmatched entries become {"key", "reason"} objects

    def __str__(self) -> str:
        lines = [
            f"adapter '{self.name}' ({self.format or 'adapter'}) applied {self.mode} at scale {self.scale:g} "
            f"to {len(self.applied)} target(s) on {len(self.modules)} module(s)"
        ]
        if self.unmatched:
            lines.append(f"{len(self.unmatched)} key(s) not applied:")
            lines += [f"  {u.key}: {u.reason}" for u in self.unmatched[:20]]
            if len(self.unmatched) > 20:
                lines.append(f"  ... and {len(self.unmatched) - 20} more")
        if self.requant_loss:
            worst = max(self.requant_loss, key=self.requant_loss.__getitem__)
            lines.append(f"requantization loss: worst {self.requant_loss[worst]:.3g} on '{worst}'")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class AdapterInfo:
    """One attached adapter, as `list_adapters` reports it."""

    name: str
    mode: str
    scale: float
    source: str
    format: str
    modules: int
    algorithms: tuple[str, ...]
    active: bool = True

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "algorithms": list(self.algorithms)}
