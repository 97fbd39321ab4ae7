"""Real-layout builders: diffusion-pipe, and OFT written by OneTrainer (provenance above each builder)."""

from __future__ import annotations

import math

import torch
from _layout_base import ADA, OUT, W1, Built, K, Q, R, V, _kron_effect, _rand, base_weight, builder

_DPIPE_META = {"format": "pt"}  # models/z_image.py save_adapter: save_file(..., metadata={'format': 'pt'})


# -- diffusion-pipe ---------------------------------------------------------------------------------
# tdrussell/diffusion-pipe models/z_image.py ZImagePipeline.save_adapter: the PEFT state dict of the
# ComfyUI-native model (utils/saver.py strips '.default'), every key prefixed 'diffusion_model.', so the
# names are ComfyUI's (fused attention.qkv, attention.out); train.py forces alpha = rank, so PEFT's
# scale is 1 and no alpha is saved. LoRA: LoraConfig (lora_A / lora_B).
@builder("diffusion-pipe-lora")
def _dpipe_lora(ix, probe):
    b = Built(metadata=dict(_DPIPE_META))
    down, up = _rand(R, 3840), _rand(3 * 3840, R)
    b.tensors["diffusion_model.layers.0.attention.qkv.lora_A.weight"] = down
    b.tensors["diffusion_model.layers.0.attention.qkv.lora_B.weight"] = up
    for n, m in enumerate((Q, K, V)):
        b.scales[m] = 1.0
        b.effects[m] = up[n * 3840:(n + 1) * 3840] @ (down @ probe(3840))
    o, i = ix.shapes[OUT].shape
    d, u = _rand(R, i), _rand(o, R)
    b.tensors |= {"diffusion_model.layers.0.attention.out.lora_A.weight": d,
                  "diffusion_model.layers.0.attention.out.lora_B.weight": u}
    b.scales[OUT], b.effects[OUT] = 1.0, u @ (d @ probe(i))
    return b


# LoKr: peft.LoKrConfig(r=rank, alpha=rank, decompose_factor=-1): lokr_w1 whole, lokr_w2 as w2_a @ w2_b
# while r < max(w2 shape) / 2; PEFT's scale alpha / r = 1. The fused qkv (11520 x 3840) as
# kron(96 x 60, 120 x 64); its rows split onto to_q / to_k / to_v.
@builder("diffusion-pipe-lokr")
def _dpipe_lokr(ix, probe):
    b = Built(metadata=dict(_DPIPE_META))
    w1, w2a, w2b = _rand(96, 60, scale=0.1), _rand(120, R), _rand(R, 64)
    stem = "diffusion_model.layers.0.attention.qkv"
    b.tensors |= {stem + ".lokr_w1": w1, stem + ".lokr_w2_a": w2a, stem + ".lokr_w2_b": w2b}
    effect = _kron_effect(w1, w2a @ w2b, 1.0, probe)
    for n, m in enumerate((Q, K, V)):
        b.scales[m], b.effects[m] = 1.0, effect[n * 3840:(n + 1) * 3840]
    return b


# -- OneTrainer OFT ---------------------------------------------------------------------------------
# Nerogar/OneTrainer modules/module/LoRAModule.py OFTModule (PeftType.OFT_2) with oft_scaled, saved by
# LoRASaverMixin._save_diffusers (convert_to_diffusers leaves oft_R keys unchanged): 'transformer.' +
# diffusers name + '.oft_R.weight' (r, b(b-1)/2) and the '.oft_R.scaled_oft' marker buffer. Its forward
# (oft_utils.py OFTRotationModule): rows / (2 sqrt(b - 1)), skew Q from the row-major strict upper
# triangle, R = I + 2Q + 2Q^2 + 2Q^3 + Q^4, the Linear runs on x_k R_k: effect W (x R - x).
@builder("onetrainer-oft-scaled")
def _ot_oft(ix, probe):
    b = Built(metadata={"ot_branch": "master", "ot_revision": "0" * 40})
    for m, block in ((ADA, 16), (W1, 32)):
        o, i = ix.shapes[m].shape
        packed = _rand(i // block, block * (block - 1) // 2, scale=0.5)
        b.tensors[f"transformer.{m}.oft_R.weight"] = packed
        b.tensors[f"transformer.{m}.oft_R.scaled_oft"] = torch.tensor(True)
        w = packed.double() / (2 * math.sqrt(block - 1))
        upper = torch.zeros(i // block, block, block, dtype=torch.float64)
        rows, cols = torch.triu_indices(block, block, 1)
        upper[:, rows, cols] = w
        q = upper - upper.transpose(1, 2)
        rot = torch.eye(block, dtype=torch.float64) + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
        x = probe(i).double().reshape(i // block, 1, block)
        moved = (x @ rot - x).reshape(i)
        b.scales[m] = 1.0
        b.effects[m] = (base_weight((o, i)).double() @ moved).float()
    return b
