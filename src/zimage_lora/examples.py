"""Tiny Z-Image models and example adapter files in every real key layout.

Used by `zimage-lora demo` (and by the tests). Each example is random factors of one algorithm on
the model's Linear layers, written through `layouts` in one trainer's layout (the key names,
suffixes, alpha conventions and metadata that trainer writes, see docs/formats.md), at a tiny rank
and width, so they exercise the real reading and resolution code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapter import Dora
from .keys.aliases import FUSED_QKV, qkv_block, qkv_groups
from .layouts import LAYOUTS as _LAYOUT_ROWS
from .layouts import Item, Layout, write

TINY_CONFIG: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 64,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 2,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 32,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [8, 12, 12],
    "axes_lens": [64, 32, 32],
}


def tiny_config(**overrides: Any) -> dict[str, Any]:
    return {**TINY_CONFIG, **overrides}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> torch.nn.Module:
    """A small random `ZImageTransformer2DModel` (dim 64, 2 layers, 1 refiner layer) in eval mode."""
    from .quiet import quiet_imports

    with quiet_imports():
        from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    make: Any = ZImageTransformer2DModel  # diffusers' register_to_config leaves its constructor untyped
    model: torch.nn.Module = make(**tiny_config(**overrides))
    # diffusers zero-initialises some layers; random weights make every layer matter for comparisons.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 / math.sqrt(p.shape[1]))
    if dtype != torch.float32:
        # diffusers warns about `.to(dtype)` on any ZImage model; the tiny model has nothing to keep in fp32.
        import logging

        log = logging.getLogger("diffusers.models.modeling_utils")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            model = model.to(dtype)
        finally:
            log.setLevel(level)
    return model.eval()


def tiny_inputs(
    seed: int = 0, dtype: torch.dtype = torch.float32, config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Inputs for a tiny model's forward: one 8x8 latent and a 7-token caption."""
    cfg = config or TINY_CONFIG
    g = torch.Generator().manual_seed(seed)
    return {
        "x": [torch.randn(cfg["in_channels"], 1, 8, 8, generator=g).to(dtype)],
        "t": torch.tensor([0.5], dtype=dtype),
        "cap_feats": [torch.randn(7, cfg["cap_feat_dim"], generator=g).to(dtype)],
    }


@torch.no_grad()
def run_model(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    out = model(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)[0]
    first: torch.Tensor = out[0]
    return first.float()


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


# --- factor builders: deterministic random factors per module ------------------------------------------

def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _lora(g: torch.Generator, out_f: int, in_f: int, rank: int) -> dict[str, torch.Tensor]:
    return {"down": _rand(g, rank, in_f, scale=1 / math.sqrt(in_f)), "up": _rand(g, out_f, rank, scale=0.2)}


def _split(n: int) -> tuple[int, int]:
    # The (small, large) factor pair of n with the small one as large as possible but <= sqrt(n).
    best = 1
    for k in range(1, int(math.isqrt(n)) + 1):
        if n % k == 0:
            best = k
    return best, n // best


def _lokr(
    g: torch.Generator, out_f: int, in_f: int, rank: int, factorized: bool, tucker: bool = False
) -> dict[str, torch.Tensor]:
    o1, o2 = _split(out_f)
    i1, i2 = _split(in_f)
    t = {"w1": _rand(g, o1, i1, scale=0.5)}
    if factorized or tucker:
        r = min(rank, o2, i2)
        if tucker:
            t |= {"w2_a": _rand(g, r, o2, scale=0.3), "w2_b": _rand(g, r, i2, scale=0.3)}
            t["t2"] = _rand(g, r, r, scale=0.3)
        else:
            t |= {"w2_a": _rand(g, o2, r, scale=0.3), "w2_b": _rand(g, r, i2, scale=0.3)}
    else:
        t |= {"w2": _rand(g, o2, i2, scale=0.05)}
    return t


def _loha(g: torch.Generator, out_f: int, in_f: int, rank: int) -> dict[str, torch.Tensor]:
    s = 1 / math.sqrt(math.sqrt(in_f))
    return {
        "w1_a": _rand(g, out_f, rank, scale=0.3), "w1_b": _rand(g, rank, in_f, scale=s),
        "w2_a": _rand(g, out_f, rank, scale=0.3), "w2_b": _rand(g, rank, in_f, scale=s),
    }


def _factors(
    kind: str, g: torch.Generator, module: torch.nn.Linear, rank: int
) -> tuple[str, dict[str, torch.Tensor], Dora | None]:
    """(algorithm, tensors, DoRA) of one example module of `kind`."""
    o, i = module.out_features, module.in_features
    if kind in ("lora", "dora"):
        t = _lora(g, o, i, rank)
        if kind == "lora":
            return "lora", t, None
        w = module.weight.detach().float()
        return "lora", t, Dora(w.norm(dim=1) * (1 + 0.1 * _rand(g, o, 1).reshape(-1)))
    if kind.startswith("lokr"):
        return "lokr", _lokr(g, o, i, rank, factorized=kind != "lokr", tucker=kind == "lokr-tucker"), None
    if kind == "loha":
        return "loha", _loha(g, o, i, rank), None
    t = {"diff": _rand(g, o, i, scale=0.02)}
    if module.bias is not None:
        t["diff_b"] = _rand(g, o, scale=0.02)
    return "full", t, None


# --- the examples: which factors, written in which layout ---------------------------------------------

@dataclass(frozen=True)
class Example:
    """One example file: random `kind` factors written in `layout` (a row of `layouts.LAYOUTS`)."""

    layout: str
    kind: str  # lora, dora, lokr, lokr-factorized, lokr-tucker, loha, full
    description: str
    alpha: float | None = None  # an alpha the trainer always writes (ai-toolkit LoKr: 9999999999)
    qkv: str = ""  # "shared-down": q, k, v trained as one fused qkv; "copy": a fused copy beside them


def _ex(*rows: tuple[str, Example]) -> dict[str, Example]:
    return dict(rows)


EXAMPLES: dict[str, Example] = _ex(
    ("ai-toolkit", Example("ai-toolkit", "lora", "F1 ai-toolkit LoRA: diffusion_model. + lora_A/lora_B, no alpha")),
    ("diffusers", Example("diffusers", "lora",
                          "F2 diffusers save_lora_weights: transformer. + lora_A/B, alpha in lora_adapter_metadata")),
    ("kohya", Example("kohya", "lora", "F3 musubi/kohya: lora_unet_ flat names + lora_down/lora_up + .alpha")),
    ("kohya-fused", Example("kohya-fused", "lora",
                            "F4 musubi-to-ComfyUI: lora_unet_ + fused qkv (block-diagonal up) and out, alpha x3")),
    ("musubi-other", Example("musubi-other", "lora",
                             "F5 musubi convert --target other: diffusion_model. + lora_A/B, sqrt(alpha/r) baked in")),
    ("diffsynth", Example("diffsynth", "lora", "F6 DiffSynth-Studio: bare names + lora_A.default.weight")),
    ("lycoris-lora", Example("lycoris", "lora", "F7 LyCORIS LoRA: lycoris_ flat names + lora_down/lora_up + .alpha")),
    ("lycoris-lokr", Example("lycoris", "lokr", "F7 LyCORIS LoKr, full factors: lokr_w1 + lokr_w2")),
    ("lycoris-lokr-factorized", Example("lycoris", "lokr-factorized",
                                        "F7 LyCORIS LoKr: lokr_w1 + lokr_w2_a/lokr_w2_b + .alpha")),
    ("lycoris-lokr-tucker", Example("lycoris", "lokr-tucker",
                                    "F7 LyCORIS LoKr tucker: lokr_w1 + lokr_w2_a/w2_b + lokr_t2 + .alpha")),
    ("lycoris-loha", Example("lycoris", "loha", "F7 LyCORIS LoHa: hada_w1_a..hada_w2_b + .alpha")),
    ("lycoris-full", Example("lycoris", "full", "F7 LyCORIS full: .diff + .diff_b")),
    ("lycoris-dora", Example("lycoris", "dora", "F7 LyCORIS DoRA: lora_down/lora_up + .dora_scale + .alpha")),
    ("ai-toolkit-lokr", Example("ai-toolkit-lycoris", "lokr",
                                "F8 ai-toolkit LoKr: diffusion_model. + lokr_w1/lokr_w2, alpha 9999999999",
                                alpha=9999999999.0)),
    ("comfy-fused", Example("comfy", "lora",
                            "F9 ComfyUI fused: diffusion_model. + native names, fused qkv lora_A/B + .alpha",
                            qkv="shared-down")),
    ("onetrainer-legacy", Example("onetrainer-legacy", "lora",
                                  "F10 OneTrainer legacy: transformer. + lora_down/lora_up + .alpha")),
    ("onetrainer-original", Example("onetrainer-original", "lora",
                                    "F10 OneTrainer original: bare names + lora_A/lora_B + .alpha")),
    ("onetrainer-comfy", Example("onetrainer-comfy", "lora",
                                 "F10 OneTrainer comfy: diffusion_model. + lora_A/lora_B + .alpha")),
    ("mixed", Example("kohya-dotted", "lora",
                      "F11 mixed (Anime-Z): kohya-flat split to_q/k/v and fused qkv, dotted .lora.down.weight",
                      qkv="copy")),
    ("peft", Example("peft", "lora",
                     "PEFT save_pretrained folder: base_model.model. + lora_A/B + adapter_config.json")),
    ("peft-dora", Example("peft", "dora", "PEFT DoRA folder: lora_magnitude_vector beside lora_A/lora_B")),
)

#: Example id -> what its file is (the demo's rows).
LAYOUTS: dict[str, str] = {name: e.description for name, e in EXAMPLES.items()}


def make_adapter(
    layout: str,
    out: str | Path,
    model: torch.nn.Module,
    *,
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    targets: list[str] | None = None,
) -> Path:
    """Write an example adapter in `layout` for `model` at `out` (a file, or a folder for PEFT layouts).

    `targets`: diffusers module names to cover (default: every Linear). Returns the path written.
    """
    if layout not in EXAMPLES:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    example = EXAMPLES[layout]
    row = _LAYOUT_ROWS[example.layout]
    g = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = targets if targets is not None else list(linears)
    if row.fused_qkv:  # the q, k, v of whole blocks first: the random factors they always had
        names = _blocks_first(names)
    scale, r = _scale_and_rank(row, example.alpha if example.alpha is not None else alpha, rank)
    items = []
    for n in names:
        algorithm, tensors, dora = _factors(example.kind, g, linears[n], rank)
        items.append(Item(n, algorithm, tensors, scale, r if algorithm != "full" else None, dora))
    if example.qkv == "shared-down":
        _share_qkv_down(items)
    elif example.qkv == "copy":
        items += _fused_copies(items)
    return write.save(items, example.layout, out)


def _scale_and_rank(row: Layout, alpha: float | None, rank: int) -> tuple[float, int | None]:
    """The items' (scale, rank): alpha / rank where the layout keeps an alpha (rank as alpha in a PEFT
    config without one); scale 1 and no alpha written where it keeps none."""
    if alpha is None:
        return 1.0, rank if row.alpha in ("metadata", "config") else None
    return (1.0, None) if row.alpha == "none" else (alpha / rank, rank)


def _blocks_first(names: list[str]) -> list[str]:
    whole = [n for trio in qkv_groups(names) for n in trio]
    return whole + [n for n in names if n not in set(whole)]


def _qkv_blocks(items: list[Item]) -> list[list[Item]]:
    """The q, k, v items of every block whose three projections are all targeted."""
    by_name = {i.name: i for i in items}
    return [[by_name[n] for n in trio] for trio in qkv_groups(by_name)]


def _share_qkv_down(items: list[Item]) -> None:
    # A LoRA trained on ComfyUI's fused qkv has one down for q, k and v: the writer fuses them exactly.
    for q, k, v in _qkv_blocks(items):
        k.tensors["down"] = v.tensors["down"] = q.tensors["down"]


def _fused_copies(items: list[Item]) -> list[Item]:
    # Anime-Z style: beside split q/k/v, a redundant fused copy (q's down, the ups stacked).
    out = []
    for q, k, v in _qkv_blocks(items):
        up = torch.cat([p.tensors["up"] for p in (q, k, v)], 0)
        fused = f"{qkv_block(q.name)}{FUSED_QKV}"
        out.append(Item(fused, "lora", {"down": q.tensors["down"].clone(), "up": up}, q.scale, q.rank))
    return out
