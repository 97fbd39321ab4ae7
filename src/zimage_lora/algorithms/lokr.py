"""LoKr: delta = kron(W1, W2), W1 = w1 or w1_a @ w1_b, W2 = w2 or w2_a @ w2_b or tucker(t2, w2_a, w2_b).

Neither the bypass nor the dynamic kernel builds kron(W1, W2): with x reshaped to (in1, in2) blocks,
x @ kron(W1, W2).T is W1 . X . W2^T, two small matmuls per token instead of one (out x in) one. W1 is
applied first: the second product then lands in the output in place as one addmm (measured faster
than W2 first on CPU, bench/dynamic.py shapes).
"""

from __future__ import annotations

import torch

from ..placement import Placement
from ._shapes import as_matrix, matrix, product, product_shape
from .base import Algorithm, Alpha, Kernel, KernelKind, Shapes, Tensors, amax, matrices


def _factor_shape(shapes: Shapes, i: int) -> tuple[int, int]:
    w, a, b, t = f"w{i}", f"w{i}_a", f"w{i}_b", f"t{i}"
    if w in shapes:
        return matrix(shapes, w)
    if a not in shapes or b not in shapes:
        raise ValueError(f"LoKr needs '{w}' or both '{a}' and '{b}'")
    return product_shape(shapes, a, b, t)


def delta_shape(shapes: Shapes) -> tuple[int, int]:
    o1, i1 = _factor_shape(shapes, 1)
    o2, i2 = _factor_shape(shapes, 2)
    return o1 * o2, i1 * i2


def rank(shapes: Shapes) -> int | None:
    # alpha / rank applies only when a factor is decomposed; both full means scale 1 (LyCORIS).
    for b in ("w1_b", "w2_b"):
        if b in shapes:
            return matrix(shapes, b)[0]
    return None


def _factor(tensors: Tensors, i: int, dtype: torch.dtype) -> torch.Tensor:
    w = tensors.get(f"w{i}")
    if w is not None:
        return as_matrix(w).to(dtype)
    return product(tensors, f"w{i}_a", f"w{i}_b", f"t{i}", dtype)


def factors(tensors: Tensors, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) as dense matrices in `dtype`; both are small, this is what dynamic mode caches."""
    return _factor(tensors, 1, dtype), _factor(tensors, 2, dtype)


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    w1, w2 = factors(tensors, torch.float32)
    return torch.kron(w1, w2)


def _w1_x(x: torch.Tensor, w1: torch.Tensor, i2: int) -> torch.Tensor:
    """W1 . X per token: x (n, i1 * i2) -> (n * o1, i2)."""
    n = x.shape[0]
    return torch.matmul(w1, x.reshape(n, w1.shape[1], i2)).reshape(n * w1.shape[0], i2)


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x @ kron(w1, w2).T without building the Kronecker product."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = _w1_x(x2, w1, w2.shape[1]) @ w2.T
    return y.reshape(*lead, w1.shape[0] * w2.shape[0])


def kron_add_(out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, alpha: Alpha) -> None:
    """out (n, o1*o2) += alpha * x @ kron(w1, w2).T, the second product added in place."""
    n, o1, (o2, i2) = x.shape[0], w1.shape[0], w2.shape
    t = _w1_x(x, w1, i2)
    if isinstance(alpha, torch.Tensor):
        t = t * alpha.to(t.dtype)
        alpha = 1.0
    if out.is_contiguous():
        out.view(n * o1, o2).addmm_(t, w2.T, alpha=alpha)
    else:
        out.add_((t @ w2.T).reshape(n, o1 * o2), alpha=alpha)


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    w1, w2 = factors(tensors, x.dtype)
    return kron_apply(x, w1, w2)


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    w1, w2 = factors(tensors, torch.float32)
    return {"w1": w1, "w2": w2}


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi) of kron(W1, W2): only the rows of W1 that cover the block are expanded."""
    w1, w2 = parts["w1"], parts["w2"]
    o2 = w2.shape[0]
    i0, i1 = lo // o2, (hi - 1) // o2 + 1
    return torch.kron(w1[i0:i1], w2)[lo - i0 * o2 : hi - i0 * o2]


def dynamic_numel(shapes: Shapes) -> int:
    (o1, i1), (o2, i2) = _factor_shape(shapes, 1), _factor_shape(shapes, 2)
    return o1 * i1 + o2 * i2


def describe(shapes: Shapes) -> str:
    (o1, i1), (o2, i2) = _factor_shape(shapes, 1), _factor_shape(shapes, 2)
    return f"kron({o1}x{i1}, {o2}x{i2})"


def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(the kept rows of W1 times the scale, W2), when the kept rows are whole blocks of W1's rows."""
    w1, w2 = factors(tensors, torch.float32)
    o2 = w2.shape[0]
    d0, n = placement.d0, placement.n
    if d0 % o2 or n % o2:
        return None  # the dense fallback
    return KernelKind.LOKR, {"w1": (w1[d0 // o2 : (d0 + n) // o2] * scale).contiguous(), "w2": w2.contiguous()}


KERNEL = Kernel(
    name=KernelKind.LOKR,
    add_=lambda rows, x, wx, t, alpha: kron_add_(rows, x, t["w1"], t["w2"], alpha),
    bound=lambda t: amax(t["w1"]) * amax(t["w2"]),  # kron's values are exactly the products: exact
)

def canonical(tensors: Tensors, scale: float, rank: int | None) -> tuple[dict[str, torch.Tensor], float, int | None]:
    """Written layouts give full LoKr factors scale 1 (LyCORIS rule); a trainer rule with another scale
    (musubi-tuner: alpha / max(w2 shape)) is folded into w2, exactly, in fp32."""
    tensors, scale, rank = matrices(tensors, scale, rank)
    if "w1" in tensors and "w2" in tensors and scale != 1.0:
        return {**tensors, "w2": tensors["w2"].float() * scale}, 1.0, None
    return tensors, scale, rank


ALGORITHM = Algorithm(
    name="lokr", title="LoKr", family="lokr", priority=10, delta_shape=delta_shape, rank=rank,
    delta=delta, bypass=bypass,
    row_parts=row_parts, delta_block=delta_block, dynamic_numel=dynamic_numel, describe=describe,
    prepare=prepare, kernels=(KERNEL,), unit_scale="both LoKr factors full",
    canonical=canonical,
)
