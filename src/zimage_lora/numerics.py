"""Small tensor checks shared by loading, applying and merging.

The NaN/Inf scan is written here only (`all_finite`, `first_nonfinite`); every check that refuses
non-finite values (a file's tensors, a hand-built adapter, a merged weight, a dynamic delta, a
merged checkpoint tensor) goes through `require_finite`. The overflow rule of both apply modes and of
the checkpoint merge (what an adapter writes must be finite in the dtype it lands in) is here too:
`check_landed`, with its cheap bounds `surely_finite` and `headroom`."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch

from .errors import IncompatibleWeightsError

# A 16-bit float is NaN/Inf exactly when all its exponent bits are set: with the sign bit cleared, its
# bits read as an int16 are then at least the exponent mask.
_EXPONENT_MASK = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
_CHUNK = 1 << 20  # elements per step of the 16-bit scan: its scratch buffer (2 MB) stays in L2


def all_finite(t: torch.Tensor) -> bool:
    """True when `t` holds no NaN or +-Inf.

    bf16/fp16 on CPU are checked on their bits as int16 (clear the sign, take the max), in L2-sized
    chunks: integer max is vectorised, where a 16-bit float `aminmax` converts every value (2-3x
    slower). Other floats use `aminmax`, ~20x faster than `isfinite(t).all()` (no boolean temporary)
    and still seeing every bad value: NaN propagates into both results, an Inf becomes the min or max.
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    mask = _EXPONENT_MASK.get(t.dtype)
    if mask is not None and t.device.type == "cpu" and t.is_contiguous():
        return _bits_below(t.reshape(-1).view(torch.int16), mask)
    if t.element_size() == 1:  # float8 has no min/max kernels; the upcast is exact
        t = t.float()
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _bits_below(bits: torch.Tensor, mask: int) -> bool:
    scratch = torch.empty(min(bits.numel(), _CHUNK), dtype=torch.int16)
    for chunk in torch.split(bits, _CHUNK):
        part = scratch[: chunk.numel()]
        torch.bitwise_and(chunk, 0x7FFF, out=part)
        if int(part.max()) >= mask:
            return False
    return True


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The key of the first tensor holding NaN/Inf, or None when all are finite.

    Tensors that lie back to back in memory with one dtype (an adapter read from one safetensors file:
    its factors are consecutive in the mapping) are scanned as one span: one `all_finite` pass over the
    whole run instead of one small, badly parallelised call per tensor. Only a span that fails is
    scanned tensor by tensor, to name the key.
    """
    if len(tensors) == 1:  # the common call (one factor, one rebuilt block): no span bookkeeping
        key, t = next(iter(tensors.items()))
        return None if all_finite(t) else key
    runs: list[list[tuple[str, torch.Tensor]]] = []
    end = None
    for key, t in tensors.items():
        if t.numel() == 0:
            continue  # holds nothing (a rank-0 factor), and a span over no bytes cannot be made
        contiguous = t.is_contiguous() and t.device.type == "cpu" and t.is_floating_point()
        if runs and contiguous and end == (t.dtype, t.data_ptr()):
            runs[-1].append((key, t))
        else:
            runs.append([(key, t)])
        end = (t.dtype, t.data_ptr() + t.numel() * t.element_size()) if contiguous else None
    for run in runs:
        if not all_finite(_span(run)):
            return next(key for key, t in run if not all_finite(t))
    return None


def _span(run: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """One tensor over the memory of `run`'s tensors (adjacent, same dtype, all alive: the caller holds
    them while the span is used, and the span reads no byte outside them)."""
    if len(run) == 1:
        return run[0][1]
    first = run[0][1]
    n = sum(t.numel() for _k, t in run)
    raw = (ctypes.c_uint8 * (n * first.element_size())).from_address(first.data_ptr())
    return torch.frombuffer(raw, dtype=first.dtype)


def require_finite(tensors: Mapping[str, torch.Tensor], message: Callable[[str, int], str]) -> None:
    """Raise `IncompatibleWeightsError(message(key, count))` for the first tensor holding NaN/Inf
    (`count`: how many it holds); return when all are finite."""
    key = first_nonfinite(tensors)
    if key is not None:
        raise IncompatibleWeightsError(message(key, count_nonfinite(tensors[key])))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values `t` holds (for error messages; slow path)."""
    return int((~torch.isfinite(t.float())).sum())


# --- the overflow rule ---------------------------------------------------------------------------
def check_landed(name: str, t: torch.Tensor, dynamic: bool = False,
                 message: Callable[[str, int], str] | None = None) -> None:
    """The overflow rule of both modes: what an adapter puts into `name` (merged: the new weight;
    dynamic: its delta times the strength), given in the dtype it lands in, must be finite.
    `message` replaces the mode's own text (the checkpoint merge names its file)."""
    if message is None:
        message = _dynamic_message(t.dtype) if dynamic else _merged_message(t.dtype)
    require_finite({name: t}, message)


def _dynamic_message(dtype: torch.dtype) -> Callable[[str, int], str]:
    return lambda key, _n: (
        f"adapter delta on '{key}' times the scale overflows the compute dtype {dtype}: every output "
        "would be NaN/Inf. Lower the scale (or, on a bf16/fp16 model, pass compute_dtype=torch.float32).")


def _merged_message(dtype: torch.dtype) -> Callable[[str, int], str]:
    return lambda key, _n: (
        f"merging into '{key}' gives non-finite values (the delta times the scale overflows the "
        f"weight's dtype {dtype}). Lower the scale or use mode='dynamic'.")


def surely_finite(sum_of_squares: float, dtype: torch.dtype) -> bool:
    """True only when an fp32 block with this sum of squares, rounded into `dtype`, is certainly all
    finite; False means "check exactly" (`check_landed` on the rounded block).

    One BLAS dot product per block instead of an elementwise isfinite on the rounded low-precision
    rows, which is many times slower on CPUs without native bf16/fp16. A finite sum of squares below
    max(dtype)**2 bounds every |x| below max(dtype), so rounding cannot overflow and nothing is NaN/Inf.
    """
    if not math.isfinite(sum_of_squares):
        return False
    return sum_of_squares < torch.finfo(dtype).max ** 2 if dtype.itemsize < 4 else True


def headroom(dtype: torch.dtype, bound: float) -> float:
    """The largest factor a value bounded by `bound` in absolute value can be scaled by and stay
    finite in `dtype` (a zero bound admits any factor a float holds)."""
    return torch.finfo(dtype).max / max(bound, 1e-300)


@contextmanager
def one_thread() -> Iterator[None]:
    """Within the block torch uses one CPU thread. For many small tensors (reading and scanning an
    adapter, a tiny model): on a busy machine each multi-threaded op waits for a second thread to be
    scheduled, which made the finite scan of a 276-target LoRA take seconds instead of ~50 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
