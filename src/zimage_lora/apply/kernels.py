"""In-place forward kernels: each adds `alpha * delta(x)` into (a row block of) the base output.

Writing into the base layer's output, instead of allocating a fresh full-size result and adding it,
is what keeps the dynamic overhead near the cost of the extra FLOPs. `alpha` is a Python float in
eager mode (fused into addmm) or a 0-d tensor under torch.compile (so a new value needs no recompile).
"""

from __future__ import annotations

import torch

Alpha = float | torch.Tensor


def lora_add_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: Alpha) -> None:
    """out (n, o) += alpha * (x @ down.T) @ up.T; x (n, i), down (r, i), up (o, r)."""
    h = x @ down.T
    if isinstance(alpha, torch.Tensor):
        out.addmm_(h * alpha.to(h.dtype), up.T)
    else:
        out.addmm_(h, up.T, alpha=alpha)


def dense_add_(out: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, alpha: Alpha) -> None:
    """out (n, o) += alpha * x @ delta.T."""
    if isinstance(alpha, torch.Tensor):
        out.addmm_(x * alpha.to(x.dtype), delta.T)
    else:
        out.addmm_(x, delta.T, alpha=alpha)


def kron_add_(out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, alpha: Alpha) -> None:
    """out (n, o1*o2) += alpha * x @ kron(w1, w2).T, as W1 . X . W2^T per token, never building kron."""
    o1, i1 = w1.shape
    o2, i2 = w2.shape
    n = x.shape[0]
    t = torch.matmul(w1, x.reshape(n, i1, i2))  # (n, o1, i2)
    if isinstance(alpha, torch.Tensor):
        t = t * alpha.to(t.dtype)
        alpha = 1.0
    if out.is_contiguous():
        out.view(n * o1, o2).addmm_(t.reshape(n * o1, i2), w2.T, alpha=alpha)
    else:
        out.add_((t @ w2.T).reshape(n, o1 * o2), alpha=alpha)


def scaled_add_(out: torch.Tensor, y: torch.Tensor, alpha: Alpha) -> None:
    """out += alpha * y (y broadcast)."""
    if isinstance(alpha, torch.Tensor):
        out.add_(y * alpha.to(y.dtype))
    else:
        out.add_(y, alpha=alpha)


def scaled_addcmul_(out: torch.Tensor, y: torch.Tensor, v: torch.Tensor, alpha: Alpha) -> None:
    """out += alpha * y * v (v a per-column vector)."""
    if isinstance(alpha, torch.Tensor):
        out.add_(y * (v * alpha.to(v.dtype)))
    else:
        out.addcmul_(y, v, value=alpha)
