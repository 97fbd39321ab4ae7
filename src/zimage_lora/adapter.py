"""The canonical, format-free adapter: what lands on which rows of which module.

Every file layout is read into this one shape, so the engine, the tools and the converters never
see a trainer's key spelling. Tensors keep the dtype they had in the file; the math promotes to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .placement import Placement


@dataclass(frozen=True)
class Unmatched:
    """A file key that was not applied, with the reason (text encoder, no such module, ...)."""

    key: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "reason": self.reason}


@dataclass
class Dora:
    """DoRA magnitude. `on_out`: one value per output row (PEFT, LyCORIS default) or per input column.

    Strength convention (ComfyUI's): the user's scale `t` interpolates between the base weight and the
    DoRA-adapted weight, W' = W + t * (m * V / ||V|| - W) with V = W + s * dW. At t = 1 this is exactly
    PEFT's and LyCORIS's result, and it keeps re-weighting O(1) in dynamic mode.
    """

    magnitude: torch.Tensor
    on_out: bool = True


@dataclass(frozen=True)
class Provenance:
    """What reports say about a target (`inspect`, `summary`, error messages); no number depends on it."""

    source_keys: tuple[str, ...] = ()  # the file keys it was read from
    alpha: float | None = None  # the file's alpha for this module
    scale_rule: str = ""  # how `Target.scale` was derived (e.g. "alpha/rank (.alpha key)")
    alpha_used: bool = True  # False where the file's alpha never enters the math (full-factor LoKr)


@dataclass
class Target:
    """One delta for one module: what the math reads. What reports say about it is `about`.

    `rows`: the slice of the module's output rows this delta covers (a split `to_q` adapter on a fused
    `qkv` Linear); None means all rows. `delta_rows`: the slice of the built delta that is kept (a fused
    `qkv` LoKr/LoHa/diff adapter on a split `to_q`); None means all of it (`placement` does the rows
    arithmetic once). `scale` is the one implied by alpha and rank for this module; the user's
    strength multiplies it at apply time. `rank` is the factors' rank (None for full-rank forms).
    """

    module: str
    algorithm: str
    tensors: dict[str, torch.Tensor]
    scale: float = 1.0
    rows: tuple[int, int] | None = None
    delta_rows: tuple[int, int] | None = None
    dora: Dora | None = None
    rank: int | None = None
    about: Provenance = field(default_factory=Provenance)
    # Placements made so far, by (rows, delta_rows, out_features): validation makes one, and every
    # later reader (dynamic slots, merged row blocks, MLX, arithmetic) gets that same object.
    _placed: dict[tuple[tuple[int, int] | None, tuple[int, int] | None, int], Placement] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    # Read-only views of `about` under the names reports have always used.
    @property
    def source_keys(self) -> tuple[str, ...]:
        return self.about.source_keys

    @property
    def alpha(self) -> float | None:
        return self.about.alpha

    @property
    def scale_rule(self) -> str:
        return self.about.scale_rule

    @property
    def alpha_used(self) -> bool:
        return self.about.alpha_used

    @property
    def label(self) -> str:
        """Module name, with the row slice when the delta covers only part of it."""
        if self.rows is None:
            return self.module
        return f"{self.module}[{self.rows[0]}:{self.rows[1]}]"

    def placement(self, out_features: int) -> Placement:
        """Where this delta lands on a module with `out_features` rows."""
        key = (self.rows, self.delta_rows, out_features)
        placed = self._placed.get(key)
        if placed is None:
            placed = self._placed[key] = Placement.of(self.rows, self.delta_rows, out_features)
        return placed

    def __repr__(self) -> str:  # short: the tensors' values would fill a terminal
        shapes = ", ".join(f"{k} {'x'.join(map(str, v.shape))}" for k, v in self.tensors.items())
        return f"Target({self.label}, {self.algorithm}, [{shapes}], scale={self.scale:g})"

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in self.tensors.values())
        if self.dora is not None:
            total += self.dora.magnitude.numel() * self.dora.magnitude.element_size()
        return total


@dataclass
class Adapter:
    """A whole adapter, resolved against one model's module names."""

    name: str
    format: str
    source: str
    targets: list[Target]
    unmatched: list[Unmatched] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    ignored: list[Unmatched] = field(default_factory=list)  # trainer data in the file, not adapter weights

    @property
    def modules(self) -> list[str]:
        """Model module names that receive a delta, in file order, without repeats."""
        return list(dict.fromkeys(t.module for t in self.targets))

    @property
    def algorithms(self) -> list[str]:
        return sorted({t.algorithm for t in self.targets})

    def nbytes(self) -> int:
        return sum(t.nbytes() for t in self.targets)

    def __repr__(self) -> str:  # short: one line, never the tensors
        return (f"Adapter({self.name!r}, format={self.format!r}, {len(self.targets)} targets on "
                f"{len(self.modules)} modules, algorithms={self.algorithms}, {len(self.unmatched)} unmatched, "
                f"source={self.source!r})")
