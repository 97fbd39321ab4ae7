"""Tiny Z-Image models and example adapter files in every real key layout.

Used by `zimage-lora demo` and by the tests. Files are written with the exact key names, suffixes,
alpha conventions and metadata that each trainer produces (see docs/formats.md), at a tiny rank and
width, so they exercise the real reading and resolution code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .keys.aliases import native_name

TINY_CONFIG: dict = {
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


def tiny_config(**overrides) -> dict:
    return {**TINY_CONFIG, **overrides}


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A small random `ZImageTransformer2DModel` (dim 64, 2 layers, 1 refiner layer) in eval mode."""
    from .quiet import quiet_imports

    with quiet_imports():
        from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**tiny_config(**overrides))
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


def tiny_inputs(seed: int = 0, dtype: torch.dtype = torch.float32, config: dict | None = None) -> dict:
    """Inputs for a tiny model's forward: one 8x8 latent and a 7-token caption."""
    cfg = config or TINY_CONFIG
    g = torch.Generator().manual_seed(seed)
    return {
        "x": [torch.randn(cfg["in_channels"], 1, 8, 8, generator=g).to(dtype)],
        "t": torch.tensor([0.5], dtype=dtype),
        "cap_feats": [torch.randn(7, cfg["cap_feat_dim"], generator=g).to(dtype)],
    }


@torch.no_grad()
def run_model(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    out = model(inputs["x"], inputs["t"], inputs["cap_feats"], return_dict=False)[0]
    return out[0].float()


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _flat(name: str) -> str:
    return name.replace(".", "_")


# --- factor builders: deterministic random factors per module ------------------------------------------

def _rand(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def _lora(g, out_f: int, in_f: int, rank: int) -> dict[str, torch.Tensor]:
    return {"down": _rand(g, rank, in_f, scale=1 / math.sqrt(in_f)), "up": _rand(g, out_f, rank, scale=0.2)}


def _split(n: int) -> tuple[int, int]:
    # The (small, large) factor pair of n with the small one as large as possible but <= sqrt(n).
    best = 1
    for k in range(1, int(math.isqrt(n)) + 1):
        if n % k == 0:
            best = k
    return best, n // best


def _lokr(g, out_f: int, in_f: int, rank: int, factorized: bool, tucker: bool = False) -> dict[str, torch.Tensor]:
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


def _loha(g, out_f: int, in_f: int, rank: int) -> dict[str, torch.Tensor]:
    s = 1 / math.sqrt(math.sqrt(in_f))
    return {
        "w1_a": _rand(g, out_f, rank, scale=0.3), "w1_b": _rand(g, rank, in_f, scale=s),
        "w2_a": _rand(g, out_f, rank, scale=0.3), "w2_b": _rand(g, rank, in_f, scale=s),
    }


# --- layouts ------------------------------------------------------------------------------------------

LORA_SUFFIX = {
    "A": (".lora_A.weight", ".lora_B.weight"),
    "A_default": (".lora_A.default.weight", ".lora_B.default.weight"),
    "down": (".lora_down.weight", ".lora_up.weight"),
    "dot": (".lora.down.weight", ".lora.up.weight"),
}

LAYOUTS: dict[str, str] = {
    "ai-toolkit": "F1 ai-toolkit LoRA: diffusion_model. + lora_A/lora_B, no alpha",
    "diffusers": "F2 diffusers save_lora_weights: transformer. + lora_A/B, alpha in lora_adapter_metadata",
    "kohya": "F3 musubi/kohya: lora_unet_ flat names + lora_down/lora_up + .alpha",
    "kohya-fused": "F4 musubi-to-ComfyUI: lora_unet_ + fused qkv (block-diagonal up) and out, alpha x3",
    "musubi-other": "F5 musubi convert --target other: diffusion_model. + lora_A/B, sqrt(alpha/r) baked in",
    "diffsynth": "F6 DiffSynth-Studio: bare names + lora_A.default.weight",
    "lycoris-lora": "F7 LyCORIS LoRA: lycoris_ flat names + lora_down/lora_up + .alpha",
    "lycoris-lokr": "F7 LyCORIS LoKr, full factors: lokr_w1 + lokr_w2",
    "lycoris-lokr-factorized": "F7 LyCORIS LoKr: lokr_w1 + lokr_w2_a/lokr_w2_b + .alpha",
    "lycoris-lokr-tucker": "F7 LyCORIS LoKr tucker: lokr_w1 + lokr_w2_a/w2_b + lokr_t2 + .alpha",
    "lycoris-loha": "F7 LyCORIS LoHa: hada_w1_a..hada_w2_b + .alpha",
    "lycoris-full": "F7 LyCORIS full: .diff + .diff_b",
    "lycoris-dora": "F7 LyCORIS DoRA: lora_down/lora_up + .dora_scale + .alpha",
    "ai-toolkit-lokr": "F8 ai-toolkit LoKr: diffusion_model. + lokr_w1/lokr_w2, alpha 9999999999",
    "comfy-fused": "F9 ComfyUI fused: diffusion_model. + native names, fused qkv lora_A/B + .alpha",
    "onetrainer-legacy": "F10 OneTrainer legacy: transformer. + lora_down/lora_up + .alpha",
    "onetrainer-original": "F10 OneTrainer original: bare names + lora_A/lora_B + .alpha",
    "onetrainer-comfy": "F10 OneTrainer comfy: diffusion_model. + lora_A/lora_B + .alpha",
    "mixed": "F11 mixed (Anime-Z): kohya-flat split to_q/k/v and fused qkv, dotted .lora.down.weight",
    "peft": "PEFT save_pretrained folder: base_model.model. + lora_A/B + adapter_config.json",
    "peft-dora": "PEFT DoRA folder: lora_magnitude_vector beside lora_A/lora_B",
}


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
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    g = torch.Generator().manual_seed(seed)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = targets if targets is not None else list(shapes)
    weights = dict(model.named_parameters())
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    out = Path(out)
    builder = _BUILDERS[layout]
    config = builder(sd, meta, g, names, shapes, weights, rank, alpha)
    if layout.startswith("peft"):
        out.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(out / "adapter_model.safetensors"), metadata=meta or None)
        (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out), metadata=meta or None)
    return out


def _put_lora(sd, key_stem: str, t: dict, style: str) -> None:
    down, up = LORA_SUFFIX[style]
    sd[key_stem + down] = t["down"].contiguous()
    sd[key_stem + up] = t["up"].contiguous()


def _simple_lora(prefix: str, style: str, alpha_key: bool, flat: bool = False, native: bool = False):
    def build(sd, meta, g, names, shapes, weights, rank, alpha):
        for n in names:
            name = native_name(n) if native else n
            stem = prefix + (_flat(name) if flat else name)
            _put_lora(sd, stem, _lora(g, *shapes[n], rank), style)
            if alpha_key and alpha is not None:
                sd[stem + ".alpha"] = torch.tensor(float(alpha))
        return None

    return build


def _diffusers(sd, meta, g, names, shapes, weights, rank, alpha):
    for n in names:
        _put_lora(sd, "transformer." + n, _lora(g, *shapes[n], rank), "A")
    cfg = {"r": rank, "lora_alpha": alpha if alpha is not None else rank, "target_modules": sorted(set(names))}
    meta["lora_adapter_metadata"] = json.dumps(cfg)
    meta["format"] = "pt"


def _musubi_other(sd, meta, g, names, shapes, weights, rank, alpha):
    for n in names:
        t = _lora(g, *shapes[n], rank)
        k = math.sqrt((alpha if alpha is not None else rank) / rank)
        _put_lora(sd, "diffusion_model." + n, {"down": t["down"] * k, "up": t["up"] * k}, "A")


def _fused_groups(names: list[str]) -> tuple[list[str], list[str]]:
    """(blocks whose q, k, v are all targeted, the remaining names)."""
    blocks = []
    for n in names:
        if n.endswith("attention.to_q"):
            b = n[: -len("to_q")]
            if all(b + p in names for p in ("to_q", "to_k", "to_v")):
                blocks.append(b)
    rest = [n for n in names if not any(n in (b + "to_q", b + "to_k", b + "to_v") for b in blocks)]
    return blocks, rest


def _kohya_fused(sd, meta, g, names, shapes, weights, rank, alpha):
    blocks, rest = _fused_groups(names)
    a = alpha if alpha is not None else rank
    for b in blocks:
        parts = [_lora(g, *shapes[b + p], rank) for p in ("to_q", "to_k", "to_v")]
        down = torch.cat([p["down"] for p in parts], 0)
        up = torch.block_diag(*[p["up"] for p in parts])
        stem = "lora_unet_" + _flat(b + "qkv")
        _put_lora(sd, stem, {"down": down, "up": up}, "down")
        sd[stem + ".alpha"] = torch.tensor(3.0 * a)
    for n in rest:
        stem = "lora_unet_" + _flat(native_name(n))
        _put_lora(sd, stem, _lora(g, *shapes[n], rank), "down")
        sd[stem + ".alpha"] = torch.tensor(float(a))


def _comfy_fused(sd, meta, g, names, shapes, weights, rank, alpha):
    blocks, rest = _fused_groups(names)
    for b in blocks:
        parts = [_lora(g, *shapes[b + p], rank) for p in ("to_q", "to_k", "to_v")]
        stem = "diffusion_model." + b + "qkv"
        _put_lora(sd, stem, {"down": parts[0]["down"], "up": torch.cat([p["up"] for p in parts], 0)}, "A")
        if alpha is not None:
            sd[stem + ".alpha"] = torch.tensor(float(alpha))
    for n in rest:
        stem = "diffusion_model." + native_name(n)
        _put_lora(sd, stem, _lora(g, *shapes[n], rank), "A")
        if alpha is not None:
            sd[stem + ".alpha"] = torch.tensor(float(alpha))


def _mixed(sd, meta, g, names, shapes, weights, rank, alpha):
    # Anime-Z style: split keys and redundant fused copies side by side, dotted lora.down / lora.up.
    blocks, _rest = _fused_groups(names)
    a = alpha if alpha is not None else rank
    for n in names:
        stem = "lora_unet_" + _flat(n)
        _put_lora(sd, stem, _lora(g, *shapes[n], rank), "dot")
        sd[stem + ".alpha"] = torch.tensor(float(a))
    for b in blocks:
        stem = "lora_unet_" + _flat(b + "qkv")
        q = sd["lora_unet_" + _flat(b + "to_q") + ".lora.down.weight"]
        ups = [sd["lora_unet_" + _flat(b + p) + ".lora.up.weight"] for p in ("to_q", "to_k", "to_v")]
        _put_lora(sd, stem, {"down": q.clone(), "up": torch.cat(ups, 0)}, "dot")
        sd[stem + ".alpha"] = torch.tensor(float(a))


def _lycoris(kind: str):
    def build(sd, meta, g, names, shapes, weights, rank, alpha):
        for n in names:
            stem = "lycoris_" + _flat(n)
            o, i = shapes[n]
            if kind == "lora":
                _put_lora(sd, stem, _lora(g, o, i, rank), "down")
            elif kind == "dora":
                t = _lora(g, o, i, rank)
                _put_lora(sd, stem, t, "down")
                w = weights[n + ".weight"].detach().float()
                sd[stem + ".dora_scale"] = (w.norm(dim=1, keepdim=True) * (1 + 0.1 * _rand(g, o, 1))).contiguous()
            elif kind.startswith("lokr"):
                t = _lokr(g, o, i, rank, factorized=kind != "lokr", tucker=kind == "lokr-tucker")
                for role, v in t.items():
                    sd[f"{stem}.lokr_{role}"] = v.contiguous()
            elif kind == "loha":
                for role, v in _loha(g, o, i, rank).items():
                    sd[f"{stem}.hada_{role}"] = v.contiguous()
            elif kind == "full":
                sd[stem + ".diff"] = _rand(g, o, i, scale=0.02)
                if n + ".bias" in weights:
                    sd[stem + ".diff_b"] = _rand(g, o, scale=0.02)
            if kind != "full" and alpha is not None:
                sd[stem + ".alpha"] = torch.tensor(float(alpha))
        meta["ss_network_module"] = "lycoris.kohya"

    return build


def _ai_toolkit_lokr(sd, meta, g, names, shapes, weights, rank, alpha):
    for n in names:
        stem = "diffusion_model." + n
        for role, v in _lokr(g, *shapes[n], rank, factorized=False).items():
            sd[f"{stem}.lokr_{role}"] = v.contiguous()
        sd[stem + ".alpha"] = torch.tensor(9999999999.0)


def _peft(dora: bool):
    def build(sd, meta, g, names, shapes, weights, rank, alpha):
        for n in names:
            t = _lora(g, *shapes[n], rank)
            _put_lora(sd, "base_model.model." + n, t, "A")
            if dora:
                w = weights[n + ".weight"].detach().float()
                sd[f"base_model.model.{n}.lora_magnitude_vector"] = w.norm(dim=1) * (1 + 0.1 * _rand(g, shapes[n][0]))
        return {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": alpha if alpha is not None else rank,
            "target_modules": sorted(set(names)),
            "use_rslora": False,
            "use_dora": dora,
            "rank_pattern": {},
            "alpha_pattern": {},
        }

    return build


_BUILDERS: dict[str, Callable] = {
    "ai-toolkit": _simple_lora("diffusion_model.", "A", alpha_key=False),
    "diffusers": _diffusers,
    "kohya": _simple_lora("lora_unet_", "down", alpha_key=True, flat=True),
    "kohya-fused": _kohya_fused,
    "musubi-other": _musubi_other,
    "diffsynth": _simple_lora("", "A_default", alpha_key=False),
    "lycoris-lora": _lycoris("lora"),
    "lycoris-lokr": _lycoris("lokr"),
    "lycoris-lokr-factorized": _lycoris("lokr-factorized"),
    "lycoris-lokr-tucker": _lycoris("lokr-tucker"),
    "lycoris-loha": _lycoris("loha"),
    "lycoris-full": _lycoris("full"),
    "lycoris-dora": _lycoris("dora"),
    "ai-toolkit-lokr": _ai_toolkit_lokr,
    "comfy-fused": _comfy_fused,
    "onetrainer-legacy": _simple_lora("transformer.", "down", alpha_key=True),
    "onetrainer-original": _simple_lora("", "A", alpha_key=True),
    "onetrainer-comfy": _simple_lora("diffusion_model.", "A", alpha_key=True),
    "mixed": _mixed,
    "peft": _peft(dora=False),
    "peft-dora": _peft(dora=True),
}
