"""Per-sample adapters, the routing: every sample of one batch with its own dynamic adapters, in one forward.

`with per_sample_adapters(model, specs): model(...)`: `specs[i]` maps adapter names to strengths for
sample i (`{}` is the base model). Inside the block each wrapped layer ignores the shared active set
and adds, for every slot some sample uses, that slot's delta on the rows of the samples that use it
(a contiguous row block per sample, so each run of samples is a view: no gather, no scatter, and the
same kernels as the shared path). Merged adapters are in the weights and so apply to every sample.

Rows to samples: Z-Image pads the image and caption tokens of each sample and stacks them, so inside
the transformer blocks a Linear sees (B, L, D) with the batch in dim 0; the timestep MLP and the
adaLN modulations see (B, D), one row per sample; the two embedders see the samples' tokens
concatenated, (sum of lengths, D), with lengths taken from the model's own `patchify_and_embed`.
Classifier-free guidance runs [cond..., uncond...] as one batch of 2B: sample j takes `specs[j % B]`.

This module holds the routing (which rows each slot adds to); `apply.per_sample` opens and closes
the block (spec checks, the patchify recorder). A block belongs to the
context that opened it (a context variable, see apply.gate): forwards on other threads run the
shared active set meanwhile, and each forward of the block keeps its own batch size and row offsets.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from ..blocks import value_at
from ..errors import LoRAError
from .gate import Forward
from .layer import AdapterLinear, rows_of
from .slot import Slot
from .state import EngineState, Record

# Wrapped modules whose input is the samples' tokens concatenated (no batch dim), by name prefix.
FLAT_INPUTS = {"all_x_embedder.": "x", "cap_embedder.": "cap"}
Level = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # stacked down, up, per-sample strength
Run = tuple[int, int, float]  # samples [j0, j1) at one strength


def _batch_error(n: int, total: int) -> LoRAError:
    return LoRAError(
        f"per_sample_adapters: {n} specs but the model ran a batch of {total}; give one spec per sample "
        f"(classifier-free guidance's doubled batch of {2 * n} is matched automatically)."
    )


class _Context:
    """One open per-sample block: the specs, the records it relies on, and each wrapped layer's routing."""

    def __init__(self, specs: list[dict[str, float]], state: EngineState | None, records: dict[str, Record]) -> None:
        self.specs = specs
        self.state = state
        self.records = records
        self.routes: dict[AdapterLinear, Routing] = {}

    def begin(self, fwd: Forward, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """A forward of the model starts inside the block: check its batch, hand it the routing."""
        x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
        if isinstance(x, list | tuple):
            if x and isinstance(x[0], list | tuple):
                raise LoRAError("per_sample_adapters: the omni (image-conditioned) forward is not supported.")
            total = len(x)
        elif isinstance(x, torch.Tensor):
            total = x.shape[0]
        else:
            raise LoRAError(f"per_sample_adapters: cannot find the batch in the model's input ({type(x).__name__}).")
        n = len(self.specs)
        if total not in (n, 2 * n):
            raise _batch_error(n, total)
        state = self.state
        if state is not None and any(state.records.get(k) is not r for k, r in self.records.items()):
            raise LoRAError(
                "per_sample_adapters: adapters the specs name were removed or replaced inside the block; "
                "attach and remove adapters outside it."
            )
        fwd.routes, fwd.total, fwd.bounds = self.routes, total, {}

    def bounds(self, fwd: Forward, flat: str | None, x: torch.Tensor, where: str) -> tuple[list[int], bool]:
        """Row offsets of each sample (len total + 1) in the flattened (rows, features) input, and
        whether every sample has the same number of rows."""
        total = fwd.total
        assert total is not None  # set by `begin` for every forward that has routes
        if x.dim() >= 3:
            if x.shape[0] != total:
                raise LoRAError(f"per_sample_adapters: layer '{where}' got a batch of {x.shape[0]}, the model {total}.")
            return self._even(total, x.numel() // (total * x.shape[-1])), True
        rows = x.shape[0] if x.dim() == 2 else 1
        if rows == total:
            return self._even(total, 1), True
        offsets = fwd.bounds.get(flat) if flat else None
        if offsets is not None and offsets[-1] == rows:
            return offsets, False
        raise LoRAError(
            f"per_sample_adapters: layer '{where}' got {rows} rows for a batch of {total} samples and no way to "
            "tell which rows belong to which sample; per-sample adapters support the Z-Image text-to-image "
            "forward (or inputs with the batch in dim 0)."
        )

    def _even(self, total: int, per: int) -> list[int]:
        # shared by threads: values never change
        cache: dict[tuple[int, int], list[int]] = self.__dict__.setdefault("_even_cache", {})
        offsets = cache.get((total, per))
        if offsets is None:
            offsets = cache[(total, per)] = [j * per for j in range(total + 1)]
        return offsets


class Routing:
    """One wrapped layer's per-sample routing: each slot a sample uses, with that sample's strength."""

    def __init__(
        self, ctx: _Context, where: str, flat: str | None, slots: list[tuple[Slot, list[float | None]]],
    ) -> None:
        self.ctx = ctx
        self.where = where
        self.flat = flat
        self.slots = slots
        self.needs_wx = any(s.needs_wx for s, _ in slots)
        # Plain LoRA slots over all rows can run stacked: one bmm pair per level for the whole batch.
        self.stackable = [(s, w) for s, w in slots if _stackable(s)]
        self.rest = [(s, w) for s, w in slots if not _stackable(s)]
        self._runs: dict[tuple[int, int], list[tuple[Slot, list[Run]]]] = {}
        self._stacks: dict[tuple[int, torch.dtype, torch.device], list[Level] | None] = {}

    def runs(self, total: int, slots: list[tuple[Slot, list[float | None]]]) -> list[tuple[Slot, list[Run]]]:
        """Per slot, the maximal runs of consecutive samples at equal strength (cached per batch size)."""
        key = (total, id(slots))  # one of this routing's own lists (slots, stackable, rest): ids stay valid
        cached = self._runs.get(key)
        if cached is None:
            n = len(self.ctx.specs)
            cached = [(slot, _runs([strengths[j % n] for j in range(total)])) for slot, strengths in slots]
            self._runs[key] = cached
        return cached

    def stacks(self, total: int, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
        """Stacked factors (down (T, r, in), up (T, out, r), strength (T, 1, 1)) per level, where the
        k-th level holds each sample's k-th LoRA (zeros where it has none; ranks zero-padded); built
        once per block. None when the plain runs need no more calls than the levels (a shared
        adapter), so stacking would not pay."""
        key = (total, x.dtype, x.device)
        if key in self._stacks:
            return self._stacks[key]
        n = len(self.ctx.specs)
        per_sample: list[list[tuple[Slot, float]]] = [[] for _ in range(total)]
        for slot, strengths in self.stackable:
            for j in range(total):
                s = strengths[j % n]
                if s is not None:
                    per_sample[j].append((slot, s))
        depth = max(len(p) for p in per_sample)
        calls = sum(len(runs) for _, runs in self.runs(total, self.stackable))
        levels = None
        if depth and calls > depth:
            levels = [_level(per_sample, k, x) for k in range(depth)]
        self._stacks[key] = levels
        return levels

    def add_(self, layer: AdapterLinear, out: torch.Tensor, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        if not self.slots:
            return out
        total = fwd.total
        assert total is not None  # set by _Context.begin
        bounds, even = self.ctx.bounds(fwd, self.flat, x, self.where)
        # DoRA's row factor needs W x without bias, taken before any delta lands
        out, out2, x2, wx = rows_of(out, x, layer.bias if self.needs_wx else None, self.needs_wx)
        looped = self.slots
        if self.stackable and even:
            levels = self.stacks(total, x2)
            if levels is not None:
                looped = self.rest
                x3 = x2.view(total, -1, x2.shape[-1])
                out3 = out2.view(total, -1, out2.shape[-1])
                for down, up, per_row in levels:
                    out3.baddbmm_(torch.bmm(x3, down.transpose(1, 2)).mul_(per_row), up.transpose(1, 2))
        for slot, runs in self.runs(total, looped):
            for j0, j1, alpha in runs:
                a, b = bounds[j0], bounds[j1]
                slot.add_(out2[a:b], x2[a:b], wx[a:b] if wx is not None else None, alpha)
        return out


def _level(
    per_sample: list[list[tuple[Slot, float]]], k: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k-th LoRA of every sample, stacked: one copy when all have one of one rank, else zero-padded."""
    chosen = [p[k] if k < len(p) else None for p in per_sample]
    alpha = torch.tensor([c[1] if c else 0.0 for c in chosen], dtype=x.dtype, device=x.device).view(-1, 1, 1)
    slots = [c[0] for c in chosen if c]
    if len(slots) == len(chosen) and len({s.down.shape[0] for s in slots}) == 1:
        down = torch.stack([s.down for s in slots]).to(device=x.device, dtype=x.dtype)
        up = torch.stack([s.up for s in slots]).to(device=x.device, dtype=x.dtype)
        return down, up, alpha
    rank = max(s.down.shape[0] for s in slots)
    down = torch.zeros(len(chosen), rank, slots[0].down.shape[1], dtype=x.dtype, device=x.device)
    up = torch.zeros(len(chosen), slots[0].up.shape[0], rank, dtype=x.dtype, device=x.device)
    for j, c in enumerate(chosen):
        if c:
            r = c[0].down.shape[0]
            down[j, :r] = c[0].down
            up[j, :, :r] = c[0].up
    return down, up, alpha


def _stackable(slot: Slot) -> bool:
    return slot.plain_lora and slot.compute_dtype is None


def _runs(strengths: list[float | None]) -> list[Run]:
    out: list[Run] = []
    for j, s in enumerate(strengths):
        if s is None:
            continue
        if out and out[-1][1] == j and out[-1][2] == s:
            out[-1] = (out[-1][0], j + 1, s)
        else:
            out.append((j, j + 1, s))
    return out


def _routings(model: nn.Module, ctx: _Context) -> dict[AdapterLinear, Routing]:
    """A routing for every wrapped layer of the model (layers without one, e.g. wrapped after the block
    opened, add nothing inside it)."""
    state = ctx.state
    if state is None:
        return {}
    slots_of: dict[str, list[tuple[Slot, list[float | None]]]] = {}
    for name, record in state.records.items():
        for module_name, keys in record.wrapped.items():
            per_layer = slots_of.setdefault(module_name, [])
            if name not in ctx.records:
                continue
            wrapper = cast(AdapterLinear, model.get_submodule(module_name))
            strengths = [None if name not in spec else value_at(spec[name], module_name) for spec in ctx.specs]
            per_layer.extend((wrapper.slots[k], strengths) for k in keys)
            if any(wrapper.slots[k].transforms_input for k in keys):  # its share lands before the base call
                raise LoRAError(f"per_sample_adapters: adapter '{name}' transforms the input of '{module_name}'; "
                                "per-sample routing adds after the base call. Apply it with mode='merged'.")
    out = {}
    for module_name, slots in slots_of.items():
        flat = next((kind for prefix, kind in FLAT_INPUTS.items() if module_name.startswith(prefix)), None)
        wrapper = cast(AdapterLinear, model.get_submodule(module_name))
        out[wrapper] = Routing(ctx, module_name, flat, slots)
    return out
