"""Z-Image name aliases, as data.

diffusers' `ZImageTransformer2DModel` and the original Tongyi-MAI / ComfyUI module trees name a few
modules differently. Each pair is (diffusers segment, native segment); the index registers every
module under both spellings, so files from either world resolve by lookup.
"""

from __future__ import annotations

from collections.abc import Iterable

NAME_ALIASES: tuple[tuple[str, str], ...] = (
    ("attention.to_out.0", "attention.out"),
    ("all_x_embedder.2-1", "x_embedder"),
    ("all_final_layer.2-1", "final_layer"),
    ("attention.norm_q", "attention.q_norm"),
    ("attention.norm_k", "attention.k_norm"),
)

# Fused attention projection: native `attention.qkv` holds rows q, k, v of diffusers' split layers.
FUSED_QKV = "attention.qkv"
SPLIT_QKV = ("attention.to_q", "attention.to_k", "attention.to_v")


def qkv_block(name: str) -> str | None:
    """The block a split q/k/v projection belongs to ('layers.0.' for 'layers.0.attention.to_k'), else None."""
    for p in SPLIT_QKV:
        if name.endswith(p):
            return name[: -len(p)]
    return None


def qkv_names(block: str) -> tuple[str, str, str]:
    """The split q, k, v projection names of `block`."""
    q, k, v = (block + p for p in SPLIT_QKV)
    return q, k, v


def qkv_groups(names: Iterable[str]) -> list[tuple[str, str, str]]:
    """The (q, k, v) names of every block whose three split projections are all in `names`, in the
    order of their q."""
    present = set(names := list(names))
    blocks = [qkv_block(n) for n in names if n.endswith(SPLIT_QKV[0])]
    return [trio for b in blocks if b is not None and set(trio := qkv_names(b)) <= present]


def alias_names(name: str) -> list[str]:
    """Other spellings of a module name (each alias applied in either direction, once)."""
    out = []
    for diffusers_seg, native_seg in NAME_ALIASES:
        for a, b in ((diffusers_seg, native_seg), (native_seg, diffusers_seg)):
            if _has_segment(name, a):
                out.append(_replace_segment(name, a, b))
    return out


def _has_segment(name: str, seg: str) -> bool:
    return f".{seg}." in f".{name}."


def _replace_segment(name: str, a: str, b: str) -> str:
    return f".{name}.".replace(f".{a}.", f".{b}.", 1)[1:-1]


def native_name(name: str) -> str:
    """diffusers module name -> the original / ComfyUI spelling (to_out.0 -> out, norm_q -> q_norm, ...)."""
    for diffusers_seg, native_seg in NAME_ALIASES:
        name = _replace_segment(name, diffusers_seg, native_seg)
    return name
