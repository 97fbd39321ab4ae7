"""`Item`: what the writers take, one module's adapter in diffusers naming."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapter import Dora


@dataclass
class Item:
    """One module's adapter in diffusers naming. `name` ends in `attention.qkv` for a delta that
    covers q, k and v together (a fused LoKr / LoHa / diff that cannot be split exactly)."""

    name: str
    algorithm: str
    tensors: dict[str, torch.Tensor]
    scale: float = 1.0
    rank: int | None = None
    dora: Dora | None = None
    source_keys: tuple[str, ...] = field(default_factory=tuple)

    @property
    def alpha(self) -> float | None:
        return None if self.rank is None else self.scale * self.rank
