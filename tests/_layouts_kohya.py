"""Real-layout builders, kohya-family trainers: ai-toolkit, musubi-tuner and its converters, VideoX-Fun.

Each writes the keys, dtypes and metadata the trainer's saving code produces (provenance above each
builder) and computes with that trainer's own formula the scale and the effect on a probe vector each
module was trained with. Module names are diffusers'; shapes are the full Z-Image-Turbo ones, rank 4.
"""

from __future__ import annotations

import json

import torch
from _layout_base import ADA, CAP, FINAL, OUT, W1, W2, Built, K, Q, R, V, _flat, _kron_effect, _lora, _rand, builder


# -- ai-toolkit ------------------------------------------------------------------------------------
# ostris/ai-toolkit toolkit/network_mixins.py ToolkitNetworkMixin.save_weights with the Z-Image
# extension's diffusion_model. prefix: PEFT-style lora_A/lora_B, no alpha tensors (alpha = rank),
# metadata 'software' {"name": "ai-toolkit"} and 'training_info'.
@builder("ai-toolkit-lora")
def _ai_toolkit_lora(ix, probe):
    b = Built(metadata={"software": json.dumps({"name": "ai-toolkit"}), "training_info": "{}"})
    for m in (Q, OUT, W1, ADA, FINAL):
        _lora(b, ix, probe, m, f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight",
              alpha=None, dtype=torch.bfloat16)
    return b


# ai-toolkit toolkit/models/lokr.py (LyCORIS LokrModule port) with lokr_full_rank: true: w1 and w2 both
# full, alpha buffer 9999999999 saved in the SaveConfig default dtype fp16 -> inf. Both factors full:
# LyCORIS sets scale 1 and never uses alpha.
@builder("ai-toolkit-lokr-full-fp16")
def _ai_toolkit_lokr_full(ix, probe):
    b = Built(metadata={"software": json.dumps({"name": "ai-toolkit"})})
    for m in (Q, OUT):
        w1, w2 = _rand(60, 60, scale=0.1), _rand(64, 64, scale=0.1)  # LyCORIS factorization(3840) = (60, 64)
        b.tensors[f"diffusion_model.{m}.lokr_w1"] = w1.half()
        b.tensors[f"diffusion_model.{m}.lokr_w2"] = w2.half()
        b.tensors[f"diffusion_model.{m}.alpha"] = torch.tensor(9999999999.0).half()  # inf in fp16
        b.scales[m] = 1.0
        b.effects[m] = _kron_effect(w1.half(), w2.half(), 1.0, probe)
    return b


# ai-toolkit LoKr with lokr_full_rank: false: w2 decomposed (w2_a, w2_b), scale alpha / rank (LyCORIS).
@builder("ai-toolkit-lokr-lowrank")
def _ai_toolkit_lokr_lowrank(ix, probe):
    b = Built(metadata={"software": json.dumps({"name": "ai-toolkit"})})
    w1, w2a, w2b = _rand(60, 60, scale=0.1), _rand(64, R), _rand(R, 64)
    b.tensors |= {f"diffusion_model.{Q}.lokr_w1": w1, f"diffusion_model.{Q}.lokr_w2_a": w2a,
                  f"diffusion_model.{Q}.lokr_w2_b": w2b, f"diffusion_model.{Q}.alpha": torch.tensor(2.0)}
    b.scales[Q] = 2.0 / R
    b.effects[Q] = _kron_effect(w1, w2a @ w2b, 2.0 / R, probe)
    return b


# -- musubi-tuner ----------------------------------------------------------------------------------
_MUSUBI_META = {"ss_network_module": "networks.lora_zimage", "ss_network_dim": "4", "ss_network_alpha": "1"}


# kohya-ss/musubi-tuner src/musubi_tuner/networks/lora_zimage.py (create_arch_network -> lora.py
# LoRANetwork, prefix "lora_unet"): lora_down/lora_up + per-module .alpha buffer (bf16 when saved in
# bf16), metadata ss_network_*.
@builder("musubi-lora")
def _musubi_lora(ix, probe):
    b = Built(metadata=dict(_MUSUBI_META))
    for m in (Q, K, V, OUT, W2, "noise_refiner.1.adaLN_modulation.0", "context_refiner.0.feed_forward.w3"):
        stem = "lora_unet_" + _flat(m)
        _lora(b, ix, probe, m, stem + ".lora_down.weight", stem + ".lora_up.weight", alpha=1.0, dtype=torch.bfloat16)
        b.tensors[stem + ".alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)
    return b


# musubi-tuner src/musubi_tuner/convert_lora.py convert_to_diffusers (--target other): module name is
# the lora name minus "lora_unet_" with every '_' turned into '.', prefix "diffusion_model", factors
# multiplied by sqrt(alpha / dim) each, no alpha tensors, and the source's metadata copied unchanged
# (ss_network_alpha included). Trained at dim 4 / alpha 1: the file must run at 1/4, once.
@builder("musubi-convert-other")
def _musubi_convert_other(ix, probe):
    b = Built(metadata=dict(_MUSUBI_META))
    for m in (Q, OUT, W1, ADA):
        dotted = _flat(m).replace("_", ".")  # 'layers.0.attention.to.q', 'layers.3.adaLN.modulation.0'
        _lora(b, ix, probe, m, f"diffusion_model.{dotted}.lora_A.weight", f"diffusion_model.{dotted}.lora_B.weight",
              alpha=1.0, scale=1.0, fold=(1.0 / R) ** 0.5)
    return b


# convert_lora.py with --diffusers_prefix - and --diffusers_adapter_name default: no prefix and a
# '.default' adapter segment (the keys then look like DiffSynth's); alpha 8 baked in.
@builder("musubi-convert-other-noprefix")
def _musubi_convert_other_noprefix(ix, probe):
    b = Built(metadata={**_MUSUBI_META, "ss_network_alpha": "8"})
    for m in (Q, W2):
        dotted = _flat(m).replace("_", ".")
        _lora(b, ix, probe, m, f"{dotted}.lora_A.default.weight", f"{dotted}.lora_B.default.weight",
              alpha=8.0, scale=1.0, fold=(8.0 / R) ** 0.5)
    return b


# convert_lora.py convert_to_diffusers (--target other) of a musubi LoHa / LoKr: the factors keep their
# names under "diffusion_model." + the module name ('_' -> '.', then 'to.q' -> 'to_q', 'feed.forward' ->
# 'feed_forward' fixed back; 'adaLN.modulation.0' stays dotted), the alpha is copied (not folded: dim is
# None for LoHa/LoKr) and the source's metadata too (ss_network_module networks.loha / networks.lokr).
@builder("musubi-convert-other-loha")
def _musubi_convert_other_loha(ix, probe):
    b = Built(metadata={**_MUSUBI_META, "ss_network_module": "networks.loha"})
    for m, name in ((Q, Q), (ADA, "layers.3.adaLN.modulation.0")):
        o, i = ix.shapes[m].shape
        w1a, w1b, w2a, w2b = (_rand(*s, scale=0.3) for s in ((o, R), (R, i), (o, R), (R, i)))
        stem = f"diffusion_model.{name}"
        b.tensors |= {stem + ".hada_w1_a": w1a, stem + ".hada_w1_b": w1b, stem + ".hada_w2_a": w2a,
                      stem + ".hada_w2_b": w2b, stem + ".alpha": torch.tensor(2.0)}
        b.scales[m] = 2.0 / R  # networks/loha.py: alpha / lora_dim
        b.effects[m] = 2.0 / R * (((w1a @ w1b) * (w2a @ w2b)) @ probe(i))
    return b


# The same converter on a LoKr of networks/lokr.py 0b2d692 (full lokr_w2, alpha saved = lora_dim 64):
# the copied metadata names networks.lokr and nothing names the later rewrite, so its scale is 1.
@builder("musubi-convert-other-lokr")
def _musubi_convert_other_lokr(ix, probe):
    b = Built(metadata={**_MUSUBI_META, "ss_network_module": "networks.lokr", "ss_network_dim": "64"})
    w1, w2 = _rand(64, 64, scale=0.1), _rand(60, 60, scale=0.1)
    stem = f"diffusion_model.{OUT}"
    b.tensors |= {stem + ".lokr_w1": w1, stem + ".lokr_w2": w2, stem + ".alpha": torch.tensor(64.0)}
    b.scales[OUT] = 1.0
    b.effects[OUT] = _kron_effect(w1, w2, 1.0, probe)
    return b


# musubi-tuner src/musubi_tuner/networks/convert_z_image_lora_to_comfy.py main (sd-scripts -> ComfyUI):
# to_q/to_k/to_v concatenated into attention_qkv (down: cat, up: block diagonal, alpha x3),
# attention_to_out_0 renamed attention_out; metadata copied.
@builder("musubi-comfy-export")
def _musubi_comfy(ix, probe):
    b = Built(metadata=dict(_MUSUBI_META))
    alpha = 2.0
    downs, ups = [], []
    for m in (Q, K, V):
        o, i = ix.shapes[m].shape
        d, u = _rand(R, i), _rand(o, R)
        downs.append(d)
        ups.append(u)
        b.scales[m] = alpha / R  # (3 alpha) / (3 R)
        b.effects[m] = alpha / R * (u @ (d @ probe(i)))
    b.tensors["lora_unet_layers_0_attention_qkv.lora_down.weight"] = torch.cat(downs, 0)
    b.tensors["lora_unet_layers_0_attention_qkv.lora_up.weight"] = torch.block_diag(*ups)
    b.tensors["lora_unet_layers_0_attention_qkv.alpha"] = torch.tensor(3 * alpha)
    _lora(b, ix, probe, OUT, "lora_unet_layers_0_attention_out.lora_down.weight",
          "lora_unet_layers_0_attention_out.lora_up.weight", alpha=alpha)
    b.tensors["lora_unet_layers_0_attention_out.alpha"] = torch.tensor(alpha)
    return b


# The same converter's LoHa branch: hada_w1_a/w2_a block diagonal, hada_w1_b/w2_b concatenated,
# alpha x3 (lossless: each q/k/v block of the fused product is that module's own LoHa delta).
@builder("musubi-comfy-export-loha")
def _musubi_comfy_loha(ix, probe):
    b = Built(metadata={**_MUSUBI_META, "ss_network_module": "networks.loha"})
    alpha = 2.0
    parts = {n: [] for n in ("w1a", "w1b", "w2a", "w2b")}
    for m in (Q, K, V):
        o, i = ix.shapes[m].shape
        w1a, w1b, w2a, w2b = (_rand(*s, scale=0.3) for s in ((o, R), (R, i), (o, R), (R, i)))
        for n, t in zip(parts, (w1a, w1b, w2a, w2b), strict=True):
            parts[n].append(t)
        b.scales[m] = alpha / R
        b.effects[m] = alpha / R * (((w1a @ w1b) * (w2a @ w2b)) @ probe(i))
    stem = "lora_unet_layers_0_attention_qkv"
    b.tensors[stem + ".hada_w1_a"] = torch.block_diag(*parts["w1a"])
    b.tensors[stem + ".hada_w2_a"] = torch.block_diag(*parts["w2a"])
    b.tensors[stem + ".hada_w1_b"] = torch.cat(parts["w1b"], 0)
    b.tensors[stem + ".hada_w2_b"] = torch.cat(parts["w2b"], 0)
    b.tensors[stem + ".alpha"] = torch.tensor(3 * alpha)
    return b


# musubi-tuner src/musubi_tuner/networks/lokr.py: LoKrModule keeps w1 full; w2 full when lora_dim >=
# max(w2 shape) (here dim 64 >= 60); get_weight scales by alpha / max(w2.shape) (not 1 as LyCORIS);
# create_arch_network registers the network buffer 'lokr_factor' (int64) saved at the top level.
# factorization(3840) = (64, 60): w1 (64, 64), w2 (60, 60).
@builder("musubi-lokr-full")
def _musubi_lokr_full(ix, probe):
    b = Built(metadata={"ss_network_module": "networks.lokr", "ss_network_dim": "64", "ss_network_alpha": "16"})
    for m in (Q, OUT):
        stem = "lora_unet_" + _flat(m)
        w1, w2 = _rand(64, 64, scale=0.1), _rand(60, 60, scale=0.1)
        b.tensors |= {stem + ".lokr_w1": w1, stem + ".lokr_w2": w2, stem + ".alpha": torch.tensor(16.0)}
        b.scales[m] = 16.0 / 60
        b.effects[m] = _kron_effect(w1, w2, 16.0 / 60, probe)
    b.tensors["lokr_factor"] = torch.tensor(-1, dtype=torch.int64)
    return b


# musubi-tuner networks/lokr.py at commit 0b2d692 (#900, the release networks/lokr.py): lora_dim 64 >=
# max(out_k, in_n) / 2 takes the full lokr_w2 path, whose __init__ forces alpha = lora_dim (saved in
# the 'alpha' buffer, 64) and merge_weights_to_tensor uses scale 1.0 ("full matrix mode"). No
# 'lokr_factor' buffer and no 'ss_lokr_factor' metadata (both came with the later rewrite).
@builder("musubi-lokr-full-0b2d692")
def _musubi_lokr_full_first(ix, probe):
    b = Built(metadata={"ss_network_module": "networks.lokr", "ss_network_dim": "64", "ss_network_alpha": "64"})
    for m in (K, V):
        stem = "lora_unet_" + _flat(m)
        w1, w2 = _rand(64, 64, scale=0.1), _rand(60, 60, scale=0.1)
        b.tensors |= {stem + ".lokr_w1": w1, stem + ".lokr_w2": w2, stem + ".alpha": torch.tensor(64.0)}
        b.scales[m] = 1.0
        b.effects[m] = _kron_effect(w1, w2, 1.0, probe)
    return b


# networks/lokr.py with lora_dim 4 < 60: w2 = w2_a @ w2_b, dim = w2_a.shape[1]; saved in bf16, so
# the 'lokr_factor' buffer is bf16 too.
@builder("musubi-lokr-lowrank-bf16-factor")
def _musubi_lokr_lowrank(ix, probe):
    b = Built(metadata={"ss_network_module": "networks.lokr"})
    stem = "lora_unet_" + _flat(Q)
    w1, w2a, w2b = _rand(64, 64, scale=0.1), _rand(60, R), _rand(R, 60)
    b.tensors |= {stem + ".lokr_w1": w1.bfloat16(), stem + ".lokr_w2_a": w2a.bfloat16(),
                  stem + ".lokr_w2_b": w2b.bfloat16(), stem + ".alpha": torch.tensor(1.0).bfloat16()}
    b.scales[Q] = 1.0 / R
    b.effects[Q] = _kron_effect(w1.bfloat16(), w2a.bfloat16().float() @ w2b.bfloat16().float(), 1.0 / R, probe)
    b.tensors["lokr_factor"] = torch.tensor(-1.0).bfloat16()
    return b


# -- VideoX-Fun -------------------------------------------------------------------------------------
# aigc-apps/VideoX-Fun videox_fun/utils/lora_utils.py LoRANetwork.create_modules: lora_name =
# "lora_unet" + "." + name + "." + child_name with name "" for the ZImageTransformer2DModel root,
# dots -> '_': "lora_unet__layers_0_...". lora_down/lora_up + alpha buffer (default alpha 1).
@builder("videox-fun")
def _videox_fun(ix, probe):
    b = Built(metadata={"sshs_model_hash": "0"})
    for m in (Q, W1, CAP):
        stem = "lora_unet__" + _flat(m)
        _lora(b, ix, probe, m, stem + ".lora_down.weight", stem + ".lora_up.weight", alpha=1.0)
        b.tensors[stem + ".alpha"] = torch.tensor(1.0)
    return b


# VideoX-Fun lora_utils.py convert_peft_lora_to_kohya_lora (the ComfyUI-compatible export of its PEFT
# runs, e.g. the Z-Image-Fun distill LoRAs): "diffusion_model." dropped, "lora_unet__" added, dots ->
# '_', lora_A/lora_B -> lora_down/lora_up, no alpha; its merge_lora then uses scale 1 (no alpha).
@builder("videox-fun-peft-export")
def _videox_fun_peft_export(ix, probe):
    b = Built()
    for m in (K, OUT, ADA):
        stem = "lora_unet__" + _flat(m)
        _lora(b, ix, probe, m, stem + ".lora_down.weight", stem + ".lora_up.weight", alpha=None)
    return b
