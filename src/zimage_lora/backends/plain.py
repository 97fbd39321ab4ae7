"""Plain `torch.nn.Linear` (any float dtype): merge rounds once into the weight's dtype."""

from __future__ import annotations

from typing import Any, cast

import torch


class PlainLinearBackend:
    name = "plain"
    supports_merge = True

    def matches(self, module: torch.nn.Module) -> bool:
        weight = getattr(module, "weight", None)
        return isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.dim() in (1, 2)

    def shape(self, module: torch.nn.Module) -> tuple[int, int]:
        w = cast(torch.Tensor, module.weight)  # `matches` checked it is a float tensor
        return (w.shape[0], w.shape[1]) if w.dim() == 2 else (w.shape[0], 1)

    def get_base_weight(self, module: torch.nn.Module) -> torch.Tensor:
        return cast(torch.Tensor, module.weight).detach().float()

    def set_base_weight(self, module: torch.nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            w = cast(torch.Tensor, module.weight)
            w.copy_(weight.reshape(w.shape))  # copy_ rounds once into the dtype

    def snapshot(self, module: torch.nn.Module) -> Any:
        return cast(torch.Tensor, module.weight).detach().clone()

    def restore(self, module: torch.nn.Module, state: Any) -> None:
        with torch.no_grad():
            cast(torch.Tensor, module.weight).copy_(state)
