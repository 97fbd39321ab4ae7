"""Regional adapters: each adapter's delta only on the image tokens whose patch lies in its mask.

`with zl.regional_adapters(pipe, {"hero": mask_a, "villain": (0.5, 0.0, 1.0, 1.0)}): pipe(...)`

A mask is an image-sized array (any resolution; soft values allowed; area-averaged onto the token
grid of each forward) or a box `(x0, y0, x1, y1)` in fractions of the width and height (a token
counts with the fraction of its patch inside the box). Give one mask for every sample, or a list
with one per sample (classifier-free guidance's doubled batch: sample j takes mask j % n).

Inside the block a wrapped layer adds a named adapter's share row by row: row r of sample j gets
`strength * w[j, r]`, where w is the mask on image tokens, `caption` on caption tokens (a number, or
"mean": the mask's mean), the mask's mean on layers that see one row per sample (the timestep MLP,
the adaLN modulations), and 0 on padding. For LoRA this is the low-rank product with its rank-r
middle scaled per row: no dense delta and no gather. Other algorithms compute their share for the
layer's rows and scale it per row. Adapters not named run as usual on every row. The strength is
the adapter's own (so per-block strengths and schedules apply on top of the masks).

Row layout (diffusers' Z-Image text-to-image forward, basic mode): every sample's image tokens are
padded to a multiple of `SEQ_MULTI_OF`, as are its caption tokens; the embedders see all samples'
tokens concatenated, the refiners one padded sequence per sample, the main layers and the final
layer `[image, caption]` per sample, padded to the longest.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own spelling

from ..errors import InvalidArgumentError, LoRAError
from ..mlx.probe import refuse
from .gate import BLOCKS, LayerRoute, gate_of
from .layer import AdapterLinear, rows_of
from .slot import Slot

SEQ_MULTI_OF = 32  # diffusers' Z-Image pads each sample's image and caption tokens to a multiple of this


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def token_weights(mask: Any, grid: tuple[int, int]) -> torch.Tensor:
    """A mask (array or box) as one weight per image token of an (h, w) token grid, raster order."""
    h, w = grid
    if isinstance(mask, tuple) and len(mask) == 4 and all(isinstance(v, (int, float)) for v in mask):
        x0, y0, x1, y1 = (float(v) for v in mask)
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise InvalidArgumentError(f"regional_adapters: a box is (x0, y0, x1, y1) in fractions of the image, "
                                       f"0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1; got {mask}")
        return torch.outer(_cover(y0, y1, h), _cover(x0, x1, w)).reshape(-1)
    t = torch.as_tensor(mask, dtype=torch.float32)
    if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidArgumentError(f"regional_adapters: a mask is a 2-D (height, width) array or a box, got shape "
                                   f"{tuple(t.shape)}")
    return F.adaptive_avg_pool2d(t[None, None], (h, w)).reshape(-1)


def _cover(lo: float, hi: float, n: int) -> torch.Tensor:
    """The fraction of each of n equal cells of [0, 1] that lies inside [lo, hi]."""
    edges = torch.arange(n + 1, dtype=torch.float64) / n
    return ((torch.minimum(edges[1:], torch.tensor(hi)) - torch.maximum(edges[:-1], torch.tensor(lo))).clamp(min=0)
            * n).float()


def _is_mask(m: Any) -> bool:
    """A box, or something two-dimensional (an array, a tensor, a list of lists)."""
    if isinstance(m, tuple) and len(m) == 4 and all(isinstance(v, (int, float)) for v in m):
        return True
    ndim = getattr(m, "ndim", None)
    if ndim is None and isinstance(m, list) and m and isinstance(m[0], list | tuple):
        ndim = 2 if not isinstance(m[0][0], list | tuple) else 3
    return ndim == 2


def _check_masks(masks: Mapping[str, Any]) -> dict[str, list[Any]]:
    if not isinstance(masks, Mapping) or not masks:
        raise InvalidArgumentError(f"regional_adapters: expected {{adapter name: mask}}, got {masks!r}")
    out = {}
    for name, m in masks.items():
        per_sample = list(m) if isinstance(m, list | tuple) and m and all(map(_is_mask, m)) else [m]
        for one in per_sample:
            token_weights(one, (2, 2))  # shape and range checks now, not in the middle of a forward
        out[name] = per_sample
    return out


class _Geometry:
    """One forward's rows: per sample its image token grid, padded image and caption lengths."""

    def __init__(self, grids: list[tuple[int, int]], caps: list[int]) -> None:
        self.grids = grids
        self.x_len = [_padded(h * w) for h, w in grids]
        self.cap_len = [_padded(c) for c in caps]
        self.cache: dict[tuple[Any, ...], torch.Tensor] = {}


class _Regions:
    """The open block: masks, caption choice, and the current forward's geometry (per thread)."""

    def __init__(self, masks: dict[str, list[Any]], caption: Any) -> None:
        self.masks = masks
        self.caption = caption
        self.local = threading.local()

    def geometry(self) -> _Geometry:
        g: _Geometry | None = getattr(self.local, "geometry", None)
        if g is None:
            raise LoRAError("regional_adapters: a wrapped layer ran outside a forward of the model of the block.")
        return g

    def image(self, name: str, j: int, g: _Geometry) -> torch.Tensor:
        masks = self.masks[name]
        return token_weights(masks[j % len(masks)], g.grids[j])

    def caption_value(self, name: str, j: int, g: _Geometry) -> float:
        if self.caption == "mean":
            return float(self.image(name, j, g).mean())
        if isinstance(self.caption, Mapping):
            return float(self.caption.get(name, 0.0))
        return float(self.caption)

    def rows(self, name: str, kind: str, x: torch.Tensor) -> torch.Tensor:
        """The weight of every row of this layer's (flattened) input for adapter `name`."""
        g = self.geometry()
        n = len(g.grids)
        key = (name, kind, tuple(x.shape))
        hit = g.cache.get(key)
        if hit is not None:
            return hit
        parts = []
        if x.dim() == 2 and x.shape[0] == n or kind == "pooled":
            w = torch.tensor([float(self.image(name, j, g).mean()) for j in range(n)])
        elif kind in ("x_flat", "cap_flat"):
            for j in range(n):
                parts.append(self._image_rows(name, j, g) if kind == "x_flat" else self._cap_rows(name, j, g))
            w = torch.cat(parts)
        else:
            length = x.shape[1]
            for j in range(n):
                if kind == "x":
                    seq = self._image_rows(name, j, g)
                elif kind == "cap":
                    seq = self._cap_rows(name, j, g)
                else:  # the unified [image, caption] sequence
                    seq = torch.cat([self._image_rows(name, j, g), self._cap_rows(name, j, g)])
                parts.append(F.pad(seq, (0, length - seq.shape[0])))
            w = torch.cat(parts)
        if w.shape[0] != x.numel() // x.shape[-1]:
            raise LoRAError(f"regional_adapters: a layer got {x.numel() // x.shape[-1]} rows where the masks give "
                            f"{w.shape[0]}; regions support Z-Image's text-to-image forward.")
        g.cache[key] = w = w.to(device=x.device)
        return w

    def _image_rows(self, name: str, j: int, g: _Geometry) -> torch.Tensor:
        w = self.image(name, j, g)
        return F.pad(w, (0, g.x_len[j] - w.shape[0]))

    def _cap_rows(self, name: str, j: int, g: _Geometry) -> torch.Tensor:
        return torch.full((g.cap_len[j],), self.caption_value(name, j, g))


def _kind(module_name: str) -> str:
    if module_name.startswith("all_x_embedder."):
        return "x_flat"
    if module_name.startswith("cap_embedder."):
        return "cap_flat"
    if module_name.startswith("noise_refiner."):
        return "x"
    if module_name.startswith("context_refiner."):
        return "cap"
    if module_name.startswith("t_embedder.") or ".adaLN_modulation." in module_name:
        return "pooled"
    return "unified"


class RegionRouting:
    """One wrapped layer inside the block: named adapters per row, the others as usual (both from the
    forward's published view, `apply.gate`)."""

    def __init__(self, regions: _Regions, kind: str) -> None:
        self.regions = regions
        self.kind = kind

    def add_(self, layer: AdapterLinear, out: torch.Tensor, x: torch.Tensor, fwd: Any) -> torch.Tensor:
        state = fwd.view.layers.get(layer)
        slots, needs_wx, _transforms = state if state is not None else layer._active
        if not slots:
            return out
        values = fwd.view.values
        out, out2, x2, wx = rows_of(out, x, layer.bias if needs_wx else None, needs_wx)
        for slot in slots:
            strength = values.get(slot.strength, slot.strength.value)
            if slot.adapter_name not in self.regions.masks:
                slot.add_(out2, x2, wx, strength)
                continue
            w = self.regions.rows(slot.adapter_name, self.kind, x).to(out2.dtype)
            _add_rows(slot, out2, x2, wx, w, strength)
        return out


def _add_rows(slot: Slot, out: torch.Tensor, x: torch.Tensor, wx: torch.Tensor | None, w: torch.Tensor,
              strength: float) -> None:
    """out[r] += strength * w[r] * slot's share of row r."""
    rows = out if slot.whole else out[:, slot.span]
    if slot.plain_lora and slot.down.dtype == x.dtype == out.dtype:
        mid = (x @ slot.down.T).mul_((w * strength).unsqueeze(1))  # the rank-r middle, scaled per row
        rows.addmm_(mid, slot.up.T)
        return
    share = torch.zeros_like(rows)
    full = share if slot.whole else torch.zeros_like(out)
    slot.add_(full, x, wx, strength)
    if not slot.whole:
        share = full[:, slot.span]
    rows.addcmul_(share, w.unsqueeze(1))


class _Block:
    """What the model's gate finds for a forward started inside the block (`apply.gate.BLOCKS`)."""

    def __init__(self, regions: _Regions, routes: Mapping[AdapterLinear, LayerRoute]) -> None:
        self.regions = regions
        self.routes = routes

    def begin(self, fwd: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("x")
        caps = args[2] if len(args) > 2 else kwargs.get("cap_feats")
        p, fp = kwargs.get("patch_size", 2), kwargs.get("f_patch_size", 1)
        if not isinstance(x, list | tuple) or not isinstance(caps, list | tuple) or (x and not torch.is_tensor(x[0])):
            raise LoRAError("regional_adapters: supports Z-Image's text-to-image forward (lists of latents, captions).")
        if any(t.shape[1] // fp != 1 for t in x):
            raise LoRAError("regional_adapters: one frame per latent expected.")
        grids = [(t.shape[-2] // p, t.shape[-1] // p) for t in x]
        self.regions.local.geometry = _Geometry(grids, [len(c) for c in caps])
        fwd.routes = self.routes


def check_caption(caption: Any, what: str = "regional_adapters: caption") -> Any:
    """The weight of caption tokens: "mean", a finite number, or {adapter name: finite number}."""
    values = list(caption.values()) if isinstance(caption, Mapping) else [caption]
    if not (caption == "mean" or all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
        raise InvalidArgumentError(f"{what} must be a finite number, {{name: number}} or 'mean', got {caption!r}")
    return caption


@contextmanager
def regional_adapters(pipe: Any, masks: Mapping[str, Any], *, caption: Any = "mean") -> Iterator[None]:
    """Inside the block, each named (dynamic, attached) adapter acts only where its mask says (see the
    module doc). `caption`: the weight of caption tokens, a number, {name: number}, or "mean". Forwards
    of the model started in this context (thread, task) inside the block run regionally; eager mode."""
    from .access import _model_of, attached

    refuse(pipe, "regional_adapters")
    model = _model_of(pipe)
    checked = _check_masks(masks)
    check_caption(caption)
    for name in checked:
        record = attached(model, name)
        if record is None or record.mode != "dynamic" or record.patches:
            raise LoRAError(f"regional_adapters: '{name}' must be attached in dynamic mode with Linear targets only "
                            f"(apply_adapter(pipe, source, name='{name}', mode='dynamic')); it is "
                            f"{'not attached' if record is None else 'merged or patches norm layers'}.")
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]
    if any(s.transforms_input for _, m in wrappers for s in m._active[0]):
        raise LoRAError("regional_adapters: an active adapter transforms a layer's input (OFT-like); routing adds "
                        "after the base call. Apply it with mode='merged'.")
    gate = gate_of(model)
    opened = BLOCKS.get()
    if gate in opened:
        raise LoRAError("regional_adapters: a per-sample or regional block is already open on this model.")
    regions = _Regions(checked, caption)
    block = _Block(regions, {m: RegionRouting(regions, _kind(n)) for n, m in wrappers})
    token = BLOCKS.set({**opened, gate: block})
    try:
        yield
    finally:
        BLOCKS.reset(token)
