"""The protocol every algorithm module fills in: one `Algorithm` (what a delta is) and, for dynamic
mode, one `Kernel` (how a prepared delta adds into a layer's output).

Conventions. `tensors` are a target's own tensors by role (as the layout table names them), in the
file's dtype; `parts` are what `row_parts` made of them (fp32, on the weight's device); `weight` is the
fp32 base weight, passed only to algorithms with `needs_weight=True` (GLoRA: W @ a1 @ a2, OFT:
(R - I) @ W, IA3: W * w): in a row block it is the same rows as the block, and in a merge it is the
current weight under the adapter (base plus what is merged before it). Every delta is unscaled
unless a docstring says "scaled"; `prepare` folds the scale in. Row ranges are half-open.

How to add an algorithm (one module plus its layout rows, nothing else):

1. Write `algorithms/<name>.py` with pure functions and, at the bottom,
   `ALGORITHM = Algorithm(name=..., family=..., priority=..., delta_shape=..., ...)`.
   `family` is the key-table family its roles come from (formats/grammar); `priority` orders it when
   one module's keys hold several families (lower wins: LoKr 10, LoHa 20, LoRA 30, full 90).
2. The registry (`algorithms/__init__.py`) imports every module of the package that declares an
   `ALGORITHM`; add the key suffixes of its roles to the rows of the trainers that write it
   (`trainers/spelling.py` for LyCORIS's, which several rows share). Merged mode, validation,
   inspect and conversion then work through this protocol.
3. Dynamic mode: give `prepare` (tensors, scale, placement, weight) -> (kernel name, fp32 tensors),
   and a `Kernel` for that name, unless the dense fallback (`DENSE`, the cached scaled delta rows) is
   good enough: `prepare=None` (or returning None) uses it. A kernel that needs the base output without
   bias sets `uses_wx`; one that transforms the input before the base call (x -> x + alpha * g(x), so
   the base runs once) sets `transform=g` and must only be chosen when `placement.whole`.
   `bound` is an upper bound on |every value| of the scaled delta the prepared tensors stand for (the
   dynamic overflow check); when it needs facts of the base weight, keep them in the prepared tensors.
   `prepare`'s weight is the fp32 base weight rows [lo, hi) of the placement (None unless
   `needs_weight`); a slot prepared from it is prepared again when that weight changes (as DoRA's).
   With an input transform active, `wx` is the base output of the transformed input (what merging
   that adapter first gives). Per-sample blocks refuse input-transform kernels (they add after the base).
4. Fused rows: `split_rows` when the rows of a fused delta have tensors of their own (LoRA: rows of
   `up`; IA3 per input column: the same vector); `row_align` when a row block of the delta needs whole
   groups of weight rows (OFT's blocks); merges then cut blocks on multiples of it.
5. DoRA needs nothing: it folds into a kernel with `scale_rows` and `dense`, else runs on `DENSE`.
6. Reading: `claims` picks between algorithms sharing a family by shape; `check_weight` checks what
   `delta_shape` cannot (a side that is the weight's own, a flag's value); `alpha_role` takes a file's
   alpha as a tensor of the algorithm, not a scale; `value_roles` may be integer flags. A role that
   counts only beside another (a bare `.weight`) is a layout rule: a trainer's `companions`.
7. Writing (convert, examples): `canonical` gives what a written file holds (LoRA: a LoCon mid folded
   into down, the rank of down; LoKr: a full-factor scale other than 1 folded into w2); `fold_scale`
   folds a scale into the factors for layouts that keep no alpha (LoRA only; others refuse).
8. `tests/test_algorithm_protocol.py` registers two weight-reading toys and checks merged, dynamic and
   a dense reference: the pattern to copy for a new algorithm's test.

Reserved prepared-tensor names, handled by the dispatcher for every kernel: `Reserved.BIAS` (the bias
diff, strength-scaled), `Reserved.DORA_FM1` (DoRA's f - 1 per row, see `dora.py`). A kernel's own
prepared tensors never use them (`check_prepared`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum

import torch

from ..errors import UnsupportedError
from ..placement import Placement
from ._shapes import as_matrix


class _Names(str, Enum):
    """Names that are their strings (compare, hash, print and format as their values)."""

    # enum.StrEnum is Python 3.11+ and the package supports 3.10: str's own printing makes a member
    # print and format as its value, as StrEnum's does.
    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


class Reserved(_Names):
    """Prepared-tensor names the dynamic dispatcher handles for every kernel (equal to their strings)."""

    BIAS = "bias"  # the bias diff's kept rows, added times the strength
    DORA_FM1 = "fm1"  # DoRA per output row: f - 1, added as alpha * (f - 1) * W x


class KernelKind(_Names):
    """The dynamic kernels the engines decide on by kind, one home for their names (equal to their
    strings, like `Reserved`): each one's `Kernel.name`, what a `prepare` returns to pick it, and what
    a slot runs. An algorithm may bring a kernel of its own (OFT, BOFT, IA3 do), named by its module
    with any other string: the engines look it up (`algorithms.kernel`) and decide nothing on it."""

    LORA = "lora"  # down/up: fused across adapters and Triton on CUDA (apply.kernels), an MLX forward
    LOKR = "lokr"  # w1/w2 Kronecker factors: an MLX forward
    DENSE = "dense"  # the scaled dense delta rows: every algorithm's fallback (and DoRA's), an MLX forward
    BIAS = "bias"  # a bias diff alone (its one tensor is `Reserved.BIAS`): adds no weight delta


def check_prepared(kind: str, tensors: Mapping[str, object]) -> None:
    """A kernel's prepare must not produce a reserved name: the dispatcher would treat it as its own."""
    clash = sorted(set(tensors) & set(Reserved))
    if clash:
        raise ValueError(f"kernel '{kind}' prepared tensors named {clash}: these names are reserved (Reserved)")


Tensors = Mapping[str, torch.Tensor]
Shapes = Mapping[str, tuple[int, ...]]
Alpha = float | torch.Tensor  # a Python float in eager mode; a 0-d tensor under torch.compile
# add_(rows, x, wx, tensors, alpha): rows (n, hi - lo) += alpha * x @ delta.T for x (n, in), in place
# one row block of a fused delta for `fuse_rows`: (tensors, scale, rank)
RowPart = tuple[dict[str, torch.Tensor], float, "int | None"]
# (out, in) of a delta; a side the tensors leave open is None (the module's own is taken)
DeltaShape = tuple["int | None", "int | None"]
AddFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", Tensors, Alpha], None]
PrepareFn = Callable[[Tensors, float, Placement, "torch.Tensor | None"], "tuple[str, dict[str, torch.Tensor]] | None"]


def _no_split(tensors: Tensors, lo: int, hi: int) -> dict[str, torch.Tensor] | None:
    return None


def _one_row(parts: Tensors) -> int:
    return 1


def matrices(tensors: Tensors, scale: float, rank: int | None) -> tuple[dict[str, torch.Tensor], float, int | None]:
    """The default `canonical`: every factor as a matrix (conv-style 1x1 saves reshaped), scale and rank kept."""
    return {role: as_matrix(v) for role, v in tensors.items()}, scale, rank


def _no_fold(tensors: Tensors, scale: float, spread: bool) -> dict[str, torch.Tensor]:
    # Unreachable through the layouts (those without an alpha spell LoRA only); a new layout must say how.
    raise UnsupportedError(f"a layout without an alpha cannot hold a scale of {scale:g} for these tensors "
                           f"({sorted(tensors)}); convert to a layout that keeps an alpha.")


def _no_fuse(parts: list[RowPart | None]) -> None:
    return None


def add_block_(
    algo: Algorithm, rows: torch.Tensor, parts: Tensors, lo: int, hi: int, alpha: float
) -> None:
    """The default `add_rows_`: rows (fp32, the module rows matching delta rows [lo, hi)) += alpha * block."""
    rows.add_(algo.delta_block(parts, lo, hi, weight=rows if algo.needs_weight else None), alpha=alpha)


@dataclass(frozen=True, kw_only=True)
class Kernel:
    """A dynamic-mode forward: prepared tensors (scale folded in, the placement's rows only) -> output."""

    name: str
    # rows (n, hi - lo) += alpha * delta(x); wx: the base output without bias on the same rows (uses_wx).
    add_: AddFn
    # Upper bound on |every value| of the scaled delta, in fp64 so it cannot overflow.
    bound: Callable[[Tensors], float]
    # The exact max |value| (fp64, a row block at a time where it is large); default: `bound` (exact there).
    abs_max: Callable[[Tensors], float] | None = None
    # Its bound is not exact and the exact value needs the base weight (OFT's rotation of W): the exact
    # check runs the kernel itself on blocks of the identity (`probe_abs_max`) instead of `abs_max`.
    probe: bool = False
    # The scaled dense delta rows (n, in) fp32; DoRA needs it to fold its row factor. None: no DoRA fold.
    dense: Callable[[Tensors], torch.Tensor] | None = None
    # Fold a per-output-row factor f (n, 1) into the prepared tensors (DoRA); None: DoRA uses `DENSE`.
    scale_rows: Callable[[Tensors, torch.Tensor], dict[str, torch.Tensor]] | None = None
    uses_wx: bool = False
    # g(x, tensors) for x (n, in): the layer runs base(x + alpha * g(x)); add_ adds the rest (if any).
    transform: Callable[[torch.Tensor, Tensors], torch.Tensor] | None = None


@dataclass(frozen=True, kw_only=True)
class Algorithm:
    """Everything about one algorithm, as plain functions of its tensors."""

    name: str  # Target.algorithm
    title: str = ""  # how messages name it ("LoKr"); default: `name`
    family: str  # the key-table family its roles come from
    priority: int  # lower wins when one module's keys hold several families
    # (out, in) of the delta from the shapes alone; ValueError saying what is inconsistent. A side the
    # tensors leave open is None (IA3's vector fixes one side only): the module's is taken.
    delta_shape: Callable[[Shapes], DeltaShape]
    # The rank alpha divides by (None: scale 1).
    rank: Callable[[Shapes], int | None]
    # delta(tensors, weight=None): the full fp32 delta, unscaled.
    delta: Callable[..., torch.Tensor]
    # bypass(x, tensors, weight=None): x @ delta.T in x's dtype, unscaled, without the dense delta where cheaper.
    bypass: Callable[..., torch.Tensor]
    # row_parts(tensors) -> parts, once per merge; delta_block(parts, lo, hi, weight=None): delta rows [lo, hi).
    row_parts: Callable[[Tensors], dict[str, torch.Tensor]]
    delta_block: Callable[..., torch.Tensor]
    # How many weight elements dynamic mode keeps for this target (factors, or a cached dense delta).
    dynamic_numel: Callable[[Shapes], int]
    # A short factor-shape description for reports, e.g. "kron(16x16, 240x240)".
    describe: Callable[[Shapes], str]
    needs_weight: bool = False
    # add_rows_(rows, parts, lo, hi, alpha): in-place `rows += alpha * delta rows [lo, hi)`; None: add_block_.
    add_rows_: Callable[[torch.Tensor, Tensors, int, int, float], None] | None = None
    # Rows [lo, hi) of a fused delta as tensors of their own (LoRA: rows of `up`), or None: keep the
    # factors and take the rows of the built delta (Target.delta_rows).
    split_rows: Callable[[Tensors, int, int], dict[str, torch.Tensor] | None] = _no_split
    # fuse_rows(parts) -> (tensors, scale, rank) of the fused rows, exactly, or None (the writer keeps
    # them apart); parts: (tensors, scale, rank) per row block (q, k, v), None for a block without a
    # delta. The inverse of split_rows, for layouts that spell a fused q/k/v.
    fuse_rows: Callable[[list[RowPart | None]], tuple[dict[str, torch.Tensor], float, int | None] | None] = _no_fuse
    # canonical(tensors, scale, rank) -> (tensors, scale, rank) as a written file holds them.
    canonical: Callable[..., tuple[dict[str, torch.Tensor], float, int | None]] = matrices
    # fold_scale(tensors, scale, spread) -> tensors meaning `scale` at scale 1, for layouts keeping no
    # alpha; spread: sqrt(scale) into every factor (musubi-tuner's "other"), else all in one factor.
    fold_scale: Callable[[Tensors, float, bool], dict[str, torch.Tensor]] = _no_fold
    # row_align(parts) (of `row_parts`): row blocks given to delta_block start and end on multiples of
    # this (OFT's block size; the whole height: all rows at once); default 1.
    row_align: Callable[[Tensors], int] = _one_row
    # Dynamic mode: (tensors, scale, placement, weight rows or None) -> (kernel name, fp32 tensors), or
    # None for the dense fallback. The kernel's own module registers it in `kernels`.
    prepare: PrepareFn | None = None
    kernels: tuple[Kernel, ...] = ()
    # Whether the tensors hold a weight delta at all (a full diff may be a bias diff only).
    has_weight: Callable[[Tensors], bool] = lambda tensors: True
    # Algorithms that share a family (one spelling) tell theirs apart by the family's shapes: the
    # reader picks the first, by priority, that claims them. None: claims any.
    claims: Callable[[Shapes], bool] | None = None
    # check_weight(shapes, (out, in), tensors or None): the delta against the weight it is built from,
    # where `delta_shape` leaves a side open or a value decides it; tensors are None before they are
    # read (check what the shapes allow). ValueError saying what does not fit.
    check_weight: Callable[[Shapes, tuple[int, int], Tensors | None], None] | None = None
    # The file's alpha is this tensor role of the algorithm (a constraint, not a scale; the scale is 1).
    alpha_role: str | None = None
    # The role that alpha takes instead where its writer means an absolute bound (ComfyUI's OFT/BOFT:
    # `formats.trainer_meta.OFTConstraint`); the algorithm reads either.
    absolute_alpha_role: str | None = None
    # Roles holding flags, not weights: any dtype (a trainer may save them as integers), never scaled.
    value_roles: tuple[str, ...] = ()
    # A form of the algorithm's keys this library does not apply, by shape (a message naming the form and
    # its writer; the reader reports the module's keys with it), or None.
    unsupported: Callable[[Shapes], str | None] | None = None
    # Why the scale is 1 when `rank` is None (inspect's scale rule), e.g. "both LoKr factors full".
    unit_scale: str = "no rank"

    def add_rows(self, rows: torch.Tensor, parts: Tensors, lo: int, hi: int, alpha: float) -> None:
        if self.add_rows_ is not None:
            self.add_rows_(rows, parts, lo, hi, alpha)
        else:
            add_block_(self, rows, parts, lo, hi, alpha)


# --- the generic dynamic kernels: a cached dense delta, and a bias diff alone ------------------------
def dense_add_(out: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, alpha: Alpha) -> None:
    """out (n, o) += alpha * x @ delta.T."""
    if isinstance(alpha, torch.Tensor):
        out.addmm_(x * alpha.to(x.dtype), delta.T)
    else:
        out.addmm_(x, delta.T, alpha=alpha)


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


def amax(x: torch.Tensor) -> float:
    """max |x| in fp64 (0 for an empty tensor)."""
    return float(x.double().abs().max()) if x.numel() else 0.0


def row_blocks(n_rows: int, n_cols: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about 1M elements each, for exact checks that must not build a whole delta."""
    step = max(1, (1 << 20) // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        yield r0, min(n_rows, r0 + step)


def probe_abs_max(kernel: Kernel, tensors: Tensors, weight: torch.Tensor) -> float:
    """The exact max |value| of the scaled delta a kernel adds, from `weight` (fp32, its rows): x = e_j
    gives column j of the delta, so blocks of the identity's rows give it a block of columns at a time."""
    t = {k: v.float() for k, v in tensors.items()}
    n_rows, n_in = weight.shape
    worst = 0.0
    for c0, c1 in row_blocks(n_in, n_rows):
        x = torch.eye(n_in, dtype=torch.float32, device=weight.device)[c0:c1]
        wx = weight.T[c0:c1].contiguous()  # x @ W^T
        rows = torch.zeros_like(wx)
        if kernel.transform is not None:  # base(x + g(x)) - base(x) = g(x) @ W^T
            rows += kernel.transform(x, t) @ weight.T
        kernel.add_(rows, x, wx, t, 1.0)
        worst = max(worst, amax(rows))
    return worst


DENSE = Kernel(
    name=KernelKind.DENSE,
    add_=lambda rows, x, wx, t, alpha: dense_add_(rows, x, t["delta"], alpha),
    bound=lambda t: amax(t["delta"]),
    dense=lambda t: t["delta"],
)
BIAS = Kernel(name=KernelKind.BIAS, add_=lambda rows, x, wx, t, alpha: None, bound=lambda t: 0.0)
