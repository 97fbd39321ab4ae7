"""Triton kernels for dynamic LoRA on CUDA: the low-rank update added inside the output tile.

The unfused path (`h = x @ A^T`, then `out.addmm_(h, B^T)`) is two cuBLAS calls; the second reads and
rewrites the whole output through a GEMM with a tiny inner dimension, which cuBLAS runs far from the
memory roofline. Here the rank-r product `h = x @ A^T` is computed once (one small cuBLAS GEMM), then:

- `lora_epilogue_`: a second pass over the output, one program per (BM, BN) tile, that loads the tile
  once, adds `alpha * h_tile @ B_tile^T` (accumulated in fp32) and stores it once. It works for any
  base layer, quantized ones included, because it only needs the base output.
- `linear_lora`: one tiled GEMM for a plain fp16/bf16/fp32 Linear, `x @ W^T (+ bias)` with the
  `alpha * h @ B^T` term accumulated into the same fp32 tile before the single store (the LoRA add is
  the GEMM's epilogue, so the output is written once and never re-read).

Several adapters on one layer run as one product: their A's and (strength-scaled) B's concatenated
along the rank (`kernels.stack`), so one kernel with the summed rank replaces one pair of calls per
adapter.

Ranks up to `MAX_RANK` (the whole padded rank is one tile). fp32 dots use IEEE fp32 (no TF32), like
torch's default. `TRITON_INTERPRET=1` runs the same kernels on CPU tensors (how the tests check them).
"""

from __future__ import annotations

import os

import torch

try:  # triton ships with CUDA builds of torch; CPU-only installs may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

MAX_RANK = 128
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def available(*tensors: torch.Tensor) -> bool:
    """True when triton imports and every tensor is on CUDA (or on CPU under the interpreter)."""
    if triton is None:
        return False
    want = "cpu" if INTERPRET else "cuda"
    return all(t.device.type == want for t in tensors)


def supported(x: torch.Tensor, rank: int) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= rank <= MAX_RANK


def _rank_block(rank: int) -> int:
    block: int = max(16, triton.next_power_of_2(rank))  # tl.dot needs an inner dimension >= 16
    return block


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # Triton's CPU interpreter multiplies bf16 tiles wrongly (3.9); bf16 products are exact in fp32,
        # so upcasting the operands there computes what the GPU's bf16 dot does.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee" if IEEE else "tf32")

    @triton.jit
    def _store(ptrs, y, mask, UPCAST: tl.constexpr):
        # The interpreter also truncates fp32 -> bf16 (the GPU rounds to nearest even): round the fp32
        # bits to nearest even first there, so the truncation is exact.
        if UPCAST:
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True)
        tl.store(ptrs, y.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def _epilogue_kernel(
        out_ptr, h_ptr, up_ptr, alpha, M, N, R,
        s_om, s_on, s_hm, s_hr, s_un, s_ur,
        BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rr = tl.arange(0, BR)
        h_mask = (rm[:, None] < M) & (rr[None, :] < R)
        b_mask = (rn[None, :] < N) & (rr[:, None] < R)
        h = tl.load(h_ptr + rm[:, None] * s_hm + rr[None, :] * s_hr, mask=h_mask, other=0.0)
        b = tl.load(up_ptr + rn[None, :] * s_un + rr[:, None] * s_ur, mask=b_mask, other=0.0)
        acc = _dot(h, b, IEEE, UPCAST)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        ptrs = out_ptr + rm[:, None] * s_om + rn[None, :] * s_on
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + alpha * acc
        _store(ptrs, y, mask, UPCAST)

    @triton.jit
    def _linear_kernel(
        out_ptr, x_ptr, w_ptr, bias_ptr, h_ptr, up_ptr, alpha, M, N, K, R,
        s_om, s_on, s_xm, s_xk, s_wn, s_wk, s_hm, s_hr, s_un, s_ur,
        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a_mask = (rm[:, None] < M) & (kk[None, :] < K)
            w_mask = (rn[None, :] < N) & (kk[:, None] < K)
            a = tl.load(x_ptr + rm[:, None] * s_xm + kk[None, :] * s_xk, mask=a_mask, other=0.0)
            w = tl.load(w_ptr + rn[None, :] * s_wn + kk[:, None] * s_wk, mask=w_mask, other=0.0)
            acc += _dot(a, w, IEEE, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        # The epilogue: the low-rank term joins the same accumulator before the one store.
        rr = tl.arange(0, BR)
        h_mask = (rm[:, None] < M) & (rr[None, :] < R)
        b_mask = (rn[None, :] < N) & (rr[:, None] < R)
        h = tl.load(h_ptr + rm[:, None] * s_hm + rr[None, :] * s_hr, mask=h_mask, other=0.0)
        b = tl.load(up_ptr + rn[None, :] * s_un + rr[:, None] * s_ur, mask=b_mask, other=0.0)
        acc += alpha * _dot(h, b, IEEE, UPCAST)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        _store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, acc, mask, UPCAST)


def _precision(dtype: torch.dtype) -> dict[str, bool]:
    return {"IEEE": dtype == torch.float32, "UPCAST": INTERPRET and dtype == torch.bfloat16}


def _tiles(m: int, n: int, block_r: int) -> tuple[int, int]:
    if INTERPRET:  # the interpreter runs each program in Python: few, large tiles
        return 64, 64
    return (64, 128) if block_r <= 64 else (64, 64)


def lora_epilogue_(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
    """out (n, o) += alpha * (x @ down.T) @ up.T in one pass over out; x (n, i), down (r, i), up (o, r).

    `out` may be a strided view (a column slice of a larger output)."""
    h = x @ down.T
    m, n = out.shape
    r = down.shape[0]
    br = _rank_block(r)
    bm, bn = _tiles(m, n, br)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _epilogue_kernel[grid](
        out, h, up, float(alpha), m, n, r,
        out.stride(0), out.stride(1), h.stride(0), h.stride(1), up.stride(0), up.stride(1),
        BM=bm, BN=bn, BR=br, **_precision(x.dtype),
    )


def linear_lora(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor, alpha: float
) -> torch.Tensor:
    """x @ weight.T (+ bias) + alpha * (x @ down.T) @ up.T as one GEMM with the LoRA term in its epilogue."""
    h = x @ down.T
    m, k = x.shape
    n = weight.shape[0]
    r = down.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    br = _rank_block(r)
    bm, bn = _tiles(m, n, br)
    bk = 64 if INTERPRET else 32
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _linear_kernel[grid](
        out, x, weight, bias if bias is not None else out, h, up, float(alpha), m, n, k, r,
        out.stride(0), out.stride(1), x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        h.stride(0), h.stride(1), up.stride(0), up.stride(1),
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=bk, BR=br, **_precision(x.dtype),
    )
    return out
