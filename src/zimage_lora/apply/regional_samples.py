"""Per-sample adapters with regions: `per_sample_regions(model, specs, regions)`.

A per-sample batch (`per_sample_adapters`: sample i runs `specs[i]`) in which sample i's adapters
named in `regions[i]` act only in that sample's mask (the masks and row weights of
`regional_adapters`): for such an adapter, row r of sample j gets `strength_j * w_j[r]`, with
`strength_j` the sample's own (per-block) strength, 0 for samples that do not use it, and `w_j` its
mask for sample j, or the whole image for samples that name no region for it. Adapters no sample
gives a region run exactly as in `per_sample_adapters`. This is what a server needs to batch
requests that each bring their own regions; one batch of one sample equals `regional_adapters` over
that sample's adapters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .gate import BLOCKS, Forward, gate_of
from .layer import AdapterLinear, rows_of
from .per_sample import Routing, _runs, per_sample_adapters
from .regional import _add_rows, _Block, _check_masks, _kind, _Regions

WHOLE = (0.0, 0.0, 1.0, 1.0)  # the mask of a sample that names no region for an adapter others confine


class _SampleRegions:
    """Each wrapped layer's per-sample routing, with the adapters that have regions weighted per row."""

    def __init__(self, routing: Routing, regions: _Regions) -> None:
        self.routing = routing
        self.regions = regions
        self.kind = _kind(routing.where)
        self.masked = any(slot.adapter_name in regions.masks for slot, _ in routing.slots)

    def add_(self, layer: AdapterLinear, out: torch.Tensor, x: torch.Tensor, fwd: Forward) -> torch.Tensor:
        r = self.routing
        if not self.masked:
            return r.add_(layer, out, x, fwd)
        total = fwd.total
        assert total is not None  # set by the per-sample context's begin
        n = len(r.ctx.specs)
        bounds, _ = r.ctx.bounds(fwd, r.flat, x, r.where)
        out, out2, x2, wx = rows_of(out, x, layer.bias if r.needs_wx else None, r.needs_wx)
        for slot, strengths in r.slots:
            per = [strengths[j % n] for j in range(total)]
            if slot.adapter_name not in self.regions.masks:
                for j0, j1, alpha in _runs(per):
                    a, b = bounds[j0], bounds[j1]
                    slot.add_(out2[a:b], x2[a:b], wx[a:b] if wx is not None else None, alpha)
                continue
            w = self.regions.rows(slot.adapter_name, self.kind, x)
            scale = torch.cat([torch.full((bounds[j + 1] - bounds[j],), per[j] or 0.0) for j in range(total)])
            _add_rows(slot, out2, x2, wx, (w * scale.to(w.device)).to(out2.dtype), 1.0)
        return out


class _Begin:
    """What the model's gate finds for a forward inside the block: the per-sample context's checks and
    row offsets first, then the regions' geometry and these routes."""

    def __init__(self, ctx: Any, block: _Block) -> None:
        self.ctx = ctx
        self.block = block

    def begin(self, fwd: Forward, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.ctx.begin(fwd, args, kwargs)
        self.block.begin(fwd, args, kwargs)


@contextmanager
def per_sample_regions(model: Any, specs: Sequence[Mapping[str, Any]],
                       regions: Sequence[Mapping[str, Any]]) -> Iterator[None]:
    """`per_sample_adapters(model, specs)` where sample i's adapters named in `regions[i]` ({adapter
    name: box or 2-D mask}, see `regional_adapters`) act only in that mask; caption tokens take the
    mask's mean. Eager mode, dynamic adapters; one block per model per context."""
    from .access import _model_of

    model = _model_of(model)
    if isinstance(regions, Mapping | str) or len(regions) != len(specs):
        raise InvalidArgumentError(f"per_sample_regions: one {{adapter: mask}} per sample ({len(specs)}), "
                                   f"got {regions!r}")
    for i, (spec, region) in enumerate(zip(specs, regions, strict=True)):
        stray = sorted(set(region) - set(spec))
        if stray:
            raise InvalidArgumentError(f"per_sample_regions: sample {i} gives regions for {stray}, which its spec "
                                       f"does not use ({sorted(spec)}).")
    names = sorted({n for region in regions for n in region})
    masks = _check_masks({n: [region.get(n, WHOLE) for region in regions] for n in names}) if names else {}
    with per_sample_adapters(model, specs):
        gate = gate_of(model)
        opened = BLOCKS.get()
        ctx = opened[gate]
        confined = _Regions(masks, "mean")
        routes = {layer: _SampleRegions(routing, confined) for layer, routing in ctx.routes.items()}
        token = BLOCKS.set({**opened, gate: _Begin(ctx, _Block(confined, routes))})
        try:
            yield
        finally:
            BLOCKS.reset(token)
