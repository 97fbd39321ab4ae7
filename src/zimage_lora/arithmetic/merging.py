"""TIES-Merging and DARE on one module's dense task vectors (each input's delta, unscaled by strength).

TIES (Yadav et al. 2023, "Resolving Interference When Merging Models"): trim each task vector to its
`density` fraction of largest magnitudes, elect each entry's sign as the sign of the sum of the trimmed
vectors, then average, entry by entry, only the strength-weighted values that agree with the elected
sign (a disjoint mean). DARE (Yu et al. 2023, "Language Models are Super Mario"): drop each entry with
probability 1 - density and rescale the survivors by 1 / density, then add them up weighted (DARE) or
go through TIES' sign election and disjoint mean (DARE-TIES). These are the definitions PEFT's
`add_weighted_adapter` uses for its `ties_svd`, `dare_linear_svd` and `dare_ties_svd` combinations
(the sign elected from the unweighted vectors, ties at 0 going to +), so results agree with it
entry for entry; DARE draws its masks from `generator`, in module order then input order.
"""

from __future__ import annotations

import torch

METHODS = ("ties", "dare", "dare_ties")


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest |values| (TIES' trim step)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    flat = t.reshape(-1)
    out = torch.zeros_like(flat)
    if k:
        idx = flat.abs().topk(k).indices
        out[idx] = flat[idx]
    return out.reshape(t.shape)


def drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop and rescale: each entry kept with probability `density`, survivors / density."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _disjoint_mean(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == elected
    weighted = stacked * weights.reshape(-1, *([1] * (stacked.dim() - 1)))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def combine_dense(method: str, tasks: list[torch.Tensor], strengths: list[float], density: float,
                  generator: torch.Generator) -> torch.Tensor:
    """The merged delta of one module from its task vectors (each fp32, the same shape)."""
    weights = torch.tensor(strengths, dtype=torch.float32)
    if method == "ties":
        return _disjoint_mean(torch.stack([trim(t, density) for t in tasks]), weights)
    dropped = torch.stack([drop(t, density, generator) for t in tasks])
    if method == "dare":
        return (dropped * weights.reshape(-1, *([1] * (dropped.dim() - 1)))).sum(0)
    return _disjoint_mean(dropped, weights)
