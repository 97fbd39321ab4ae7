"""LoRA: delta = up @ (mid @) down. Tensors: `down` (r, in), `up` (out, r), optional `mid` (r, r)."""

from __future__ import annotations

import math

import torch

from ..placement import Placement
from ._shapes import as_matrix, matrix
from .base import Algorithm, Alpha, Kernel, KernelKind, RowPart, Shapes, Tensors, amax, matrices, row_blocks


def delta_shape(shapes: Shapes) -> tuple[int, int]:
    r_down, n_in = matrix(shapes, "down")
    n_out, r_up = matrix(shapes, "up")
    r_in = r_down
    if "mid" in shapes:
        r_mid_out, r_mid_in = matrix(shapes, "mid")
        if r_mid_in != r_down:
            raise ValueError(f"'mid' takes {r_mid_in} inputs but 'down' gives rank {r_down}")
        r_in = r_mid_out
    if r_up != r_in:
        raise ValueError(f"rank mismatch: 'down' has rank {r_in} (rows), 'up' expects {r_up} (columns)")
    return n_out, n_in


def rank(shapes: Shapes) -> int | None:
    return matrix(shapes, "down")[0]


def _down(tensors: Tensors) -> torch.Tensor:
    """fp32 down with mid folded in: (r, in)."""
    down = as_matrix(tensors["down"]).float()
    if "mid" in tensors:
        down = as_matrix(tensors["mid"]).float() @ down
    return down


def delta(tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    return as_matrix(tensors["up"]).float() @ _down(tensors)


def bypass(x: torch.Tensor, tensors: Tensors, weight: torch.Tensor | None = None) -> torch.Tensor:
    h = x @ as_matrix(tensors["down"]).to(x.dtype).T
    if "mid" in tensors:
        h = h @ as_matrix(tensors["mid"]).to(x.dtype).T
    return h @ as_matrix(tensors["up"]).to(x.dtype).T


def row_parts(tensors: Tensors) -> dict[str, torch.Tensor]:
    """fp32 parts from which any block of rows of the delta is cheap: (up, down with mid folded in)."""
    return {"up": as_matrix(tensors["up"]).float(), "down": _down(tensors)}


def delta_block(parts: Tensors, lo: int, hi: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi) of the delta: a slice of up times down."""
    return parts["up"][lo:hi] @ parts["down"]


def add_rows_(rows: torch.Tensor, parts: Tensors, lo: int, hi: int, alpha: float) -> None:
    rows.addmm_(parts["up"][lo:hi], parts["down"], alpha=alpha)  # no (rows x in) temporary


def split_rows(tensors: Tensors, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """Rows of a fused delta exactly: `down` is shared, `up` gives its rows."""
    return {**tensors, "up": tensors["up"][lo:hi]}


def dynamic_numel(shapes: Shapes) -> int:
    return sum(_numel(shapes[k]) for k in ("down", "up", "mid") if k in shapes)


def describe(shapes: Shapes) -> str:
    n_out, n_in = delta_shape(shapes)
    mid = " (with mid)" if "mid" in shapes else ""
    return f"{n_out}x{rank(shapes)} @ {rank(shapes)}x{n_in}{mid}"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- dynamic mode --------------------------------------------------------------------------------
def prepare(
    tensors: Tensors, scale: float, placement: Placement, weight: torch.Tensor | None = None
) -> tuple[str, dict[str, torch.Tensor]]:
    """(down with mid folded in, the kept rows of up times the scale), fp32."""
    up = placement.take(as_matrix(tensors["up"]).float()) * scale
    return KernelKind.LORA, {"down": _down(tensors).contiguous(), "up": up.contiguous()}


def add_factors_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: Alpha) -> None:
    """out (n, o) += alpha * (x @ down.T) @ up.T; x (n, i), down (r, i), up (o, r)."""
    h = x @ down.T
    if isinstance(alpha, torch.Tensor):
        out.addmm_(h * alpha.to(h.dtype), up.T)
    else:
        out.addmm_(h, up.T, alpha=alpha)


def _bound(t: Tensors) -> float:
    """|(up @ down)_ij| <= ||up_i|| ||down_:j|| (Cauchy-Schwarz), in fp64."""
    up, down = t["up"].double(), t["down"].double()
    rows = float(up.norm(dim=1).max()) if up.numel() else 0.0
    cols = float(down.norm(dim=0).max()) if down.numel() else 0.0
    return rows * cols


def _abs_max(t: Tensors) -> float:
    up, down = t["up"].double(), t["down"].double()
    return max((amax(up[r0:r1] @ down) for r0, r1 in row_blocks(up.shape[0], down.shape[1])), default=0.0)


KERNEL = Kernel(
    name=KernelKind.LORA,
    add_=lambda rows, x, wx, t, alpha: add_factors_(rows, x, t["down"], t["up"], alpha),
    bound=_bound,
    abs_max=_abs_max,
    dense=lambda t: t["up"] @ t["down"],
    scale_rows=lambda t, f: {**t, "up": t["up"] * f},
)

def canonical(tensors: Tensors, scale: float, rank: int | None) -> tuple[dict[str, torch.Tensor], float, int | None]:
    """What a written file holds: a LoCon mid folded into down (exact in fp32), the rank of down."""
    tensors = dict(tensors)
    if "mid" in tensors:
        mid = tensors.pop("mid")
        tensors["down"] = as_matrix(mid).float() @ as_matrix(tensors["down"]).float()
    tensors, scale, rank = matrices(tensors, scale, rank)
    return tensors, scale, rank if rank is not None else tensors["down"].shape[0]


def fold_scale(tensors: Tensors, scale: float, spread: bool) -> dict[str, torch.Tensor]:
    """spread: sqrt(scale) in each factor, in their dtype (musubi-tuner convert_lora.py --target other);
    else the scale into up, in fp32 (as OneTrainer's convert_to_diffusers does)."""
    if spread:
        k = math.sqrt(scale)
        return {r: v * k for r, v in tensors.items()}
    return {**tensors, "up": tensors["up"].float() * scale}


def fuse_rows(parts: list[RowPart | None]) -> tuple[dict[str, torch.Tensor], float, int | None]:
    """q, k, v LoRAs as one on the fused rows, exactly: one shared down when they have the same down
    and scale (rank r); otherwise the downs stacked and each up in its own row and column block
    (block-diagonal, rank = the sum of the ranks), different scales folded into the ups in fp32."""
    present = [p for p in parts if p is not None]
    ref, ref_scale, ref_rank = present[0]
    d = ref["up"].shape[0]
    same_down = all(t["down"].shape == ref["down"].shape and torch.equal(t["down"], ref["down"]) for t, _, _ in present)
    same_scale = all(s == ref_scale for _, s, _ in present)
    if same_down and same_scale:  # one shared down: the natural fused form, rank r
        r = ref["down"].shape[0]
        ups = [p[0]["up"] if p is not None else ref["up"].new_zeros(d, r) for p in parts]
        return {"down": ref["down"], "up": torch.cat(ups, 0)}, ref_scale, ref_rank
    total = sum(t["down"].shape[0] for t, _, _ in present)
    fold = not same_scale
    dtype = torch.float32 if fold else torch.promote_types(ref["up"].dtype, ref["down"].dtype)
    down = torch.cat([t["down"].to(dtype) for t, _, _ in present], 0)
    up = torch.zeros(3 * d, total, dtype=dtype)
    col = 0
    for i, p in enumerate(parts):
        if p is None:
            continue
        t, s, _ = p
        r = t["down"].shape[0]
        block = t["up"].to(dtype)
        up[i * d:(i + 1) * d, col:col + r] = block * s if fold else block
        col += r
    return {"down": down, "up": up}, 1.0 if fold else ref_scale, total


ALGORITHM = Algorithm(
    name="lora", title="LoRA", family="lora", priority=30, delta_shape=delta_shape, rank=rank,
    delta=delta, bypass=bypass,
    row_parts=row_parts, delta_block=delta_block, add_rows_=add_rows_, split_rows=split_rows,
    dynamic_numel=dynamic_numel, describe=describe, prepare=prepare, kernels=(KERNEL,),
    canonical=canonical, fold_scale=fold_scale, fuse_rows=fuse_rows,
)
