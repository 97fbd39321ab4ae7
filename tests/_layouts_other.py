"""Real-layout builders: OneTrainer, DiffSynth-Studio, SimpleTuner/LyCORIS, mflux, ComfyUI, Civitai,
diffusers, and files posted in load-failure reports (provenance above each builder)."""

from __future__ import annotations

import json

import torch
from _layout_base import (
    _G,
    ADA,
    CAP,
    FINAL,
    OUT,
    W1,
    W2,
    XEMB,
    Built,
    K,
    Q,
    R,
    V,
    _flat,
    _kron_effect,
    _lora,
    _rand,
    builder,
)

# -- OneTrainer -------------------------------------------------------------------------------------
# Nerogar/OneTrainer modules/modelSaver/mixin/DtypeModelSaverMixin._create_safetensors_header writes
# modelspec.* and ot_branch / ot_revision; modules/modelSaver/zImage/ZImageLoRASaver with
# LoRASaverMixin's per-format methods below.
_OT_META = {"modelspec.architecture": "Z-Image/lora", "ot_branch": "master", "ot_revision": "0" * 40}


# LoRASaverMixin._save_diffusers -> convert_to_diffusers: transformer. + lora_A/lora_B, alpha folded
# into lora_B and the .alpha key dropped.
@builder("onetrainer-diffusers")
def _ot_diffusers(ix, probe):
    b = Built(metadata=dict(_OT_META))
    for m in (Q, W2):
        o, i = ix.shapes[m].shape
        down, up = _rand(R, i), _rand(o, R)
        b.tensors[f"transformer.{m}.lora_A.weight"] = down
        b.tensors[f"transformer.{m}.lora_B.weight"] = up * (8.0 / R)
        b.scales[m] = 1.0
        b.effects[m] = 8.0 / R * (up @ (down @ probe(i)))
    return b


# ZImageLoRASaver._convert_legacy (identity of the canonical dict): transformer. + diffusers names +
# OneTrainer's native lora_down/lora_up + .alpha.
@builder("onetrainer-legacy")
def _ot_legacy(ix, probe):
    b = Built(metadata=dict(_OT_META))
    for m in (Q, XEMB):
        _lora(b, ix, probe, m, f"transformer.{m}.lora_down.weight", f"transformer.{m}.lora_up.weight", alpha=2.0)
        b.tensors[f"transformer.{m}.alpha"] = torch.tensor(2.0)
    return b


# LoRASaverMixin._save_original: the transformer prefix removed, lora_A/lora_B, .alpha kept.
@builder("onetrainer-original")
def _ot_original(ix, probe):
    b = Built(metadata=dict(_OT_META))
    for m in (K, W1):
        _lora(b, ix, probe, m, f"{m}.lora_A.weight", f"{m}.lora_B.weight", alpha=8.0)
        b.tensors[f"{m}.alpha"] = torch.tensor(8.0)
    return b


# LoRASaverMixin._save_comfy: diffusion_model. + lora_A/lora_B + .alpha + dora_scale kept; OneTrainer's
# default DoRA magnitude is per input column, shape [1, in] (convert_to_diffusers' comment).
@builder("onetrainer-comfy-dora-per-input")
def _ot_comfy_dora(ix, probe):
    b = Built(metadata=dict(_OT_META))
    o, i = ix.shapes[Q].shape
    _lora(b, ix, probe, Q, f"diffusion_model.{Q}.lora_A.weight", f"diffusion_model.{Q}.lora_B.weight", alpha=4.0)
    b.tensors[f"diffusion_model.{Q}.alpha"] = torch.tensor(4.0)
    b.tensors[f"diffusion_model.{Q}.dora_scale"] = torch.rand(1, i, generator=_G) + 0.5
    return b


# LoRASaverMixin._save_kohya -> lora_kohya_conversion + kohya_flatten: lora_unet_ flat names (split
# q/k/v for Z-Image: ZImageModel's comment, no fusion_groups), lora_down/lora_up + .alpha.
@builder("onetrainer-kohya")
def _ot_kohya(ix, probe):
    b = Built(metadata=dict(_OT_META))
    for m in (V, ADA):
        stem = "lora_unet_" + _flat(m)
        _lora(b, ix, probe, m, stem + ".lora_down.weight", stem + ".lora_up.weight", alpha=1.0)
        b.tensors[stem + ".alpha"] = torch.tensor(1.0)
    return b


# -- DiffSynth-Studio -------------------------------------------------------------------------------
# modelscope/DiffSynth-Studio training module (PEFT LoraConfig with lora_alpha = rank, state dict
# exported without the pipeline prefix): bare diffusers names + lora_A/lora_B '.default', no alpha
# (/work/shared/reference/adapter-formats.md F6).
@builder("diffsynth")
def _diffsynth(ix, probe):
    b = Built()
    for m in (Q, OUT, W1):
        _lora(b, ix, probe, m, f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight", alpha=None)
    return b


# DiffSynth-Studio Z-Image-Omni-Base LoRA: the Omni transformer's siglip_refiner modules are trained
# too; on a Turbo model they name no module.
@builder("diffsynth-omni-on-turbo")
def _diffsynth_omni(ix, probe):
    b = _diffsynth(ix, probe)
    b.tensors["siglip_refiner.0.attention.to_q.lora_A.default.weight"] = _rand(R, 3840)
    b.tensors["siglip_refiner.0.attention.to_q.lora_B.default.weight"] = _rand(3840, R)
    return b


# -- SimpleTuner (LyCORIS) --------------------------------------------------------------------------
# bghira/SimpleTuner documentation/LYCORIS.md default lycoris_config.json {"algo": "lokr",
# "linear_dim": 10000, "linear_alpha": 1, "factor": 16}: LyCORIS LokrModule with dim >= max shape
# -> both factors full (factor 16: w1 (16, 16), w2 (240, 240)), alpha 1 saved but scale 1;
# LycorisNetwork prefix "lycoris_".
@builder("simpletuner-lycoris-lokr")
def _simpletuner_lokr(ix, probe):
    b = Built()
    for m in (Q, OUT):
        stem = "lycoris_" + _flat(m)
        w1, w2 = _rand(16, 16, scale=0.1), _rand(240, 240, scale=0.1)
        b.tensors |= {stem + ".lokr_w1": w1, stem + ".lokr_w2": w2, stem + ".alpha": torch.tensor(1.0)}
        b.scales[m] = 1.0
        b.effects[m] = _kron_effect(w1, w2, 1.0, probe)
    return b


# LyCORIS LoConModule with dora_wd (SimpleTuner "lora" algo + dora_wd): lora_down/lora_up + .alpha +
# dora_scale of shape (out, 1) (wd_on_output default True: one magnitude per output row).
@builder("simpletuner-lycoris-dora")
def _simpletuner_dora(ix, probe):
    b = Built()
    stem = "lycoris_" + _flat(W2)
    o, _i = ix.shapes[W2].shape
    _lora(b, ix, probe, W2, stem + ".lora_down.weight", stem + ".lora_up.weight", alpha=4.0)
    b.tensors[stem + ".alpha"] = torch.tensor(4.0)
    b.tensors[stem + ".dora_scale"] = torch.rand(o, 1, generator=_G) + 0.5
    return b


# -- mflux ------------------------------------------------------------------------------------------
# filipstrand/mflux src/mflux/models/z_image/training_adapter/z_image_training_adapter.py
# ZImageTrainingAdapter.save_lora_adapter / _append_train_lora_weights: diffusion_model. + module path
# (diffusers names), lora_A / lora_B transposed to PEFT orientation, no alpha (LoRALinear scale 1),
# metadata {"mflux_version", "model"}.
@builder("mflux")
def _mflux(ix, probe):
    b = Built(metadata={"mflux_version": "0.13.0", "model": "z-image-turbo"})
    for m in (Q, OUT, CAP, FINAL):
        _lora(b, ix, probe, m, f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight", alpha=None)
    return b


# -- ComfyUI ----------------------------------------------------------------------------------------
def _fused_qkv(b: Built, ix, probe, stem: str, down_suffix: str, up_suffix: str, alpha: float | None) -> None:
    """A LoRA trained on ComfyUI's native fused attention.qkv (11520 x 3840): one down, one up."""
    down, up = _rand(R, 3840), _rand(3 * 3840, R)
    b.tensors[stem + down_suffix], b.tensors[stem + up_suffix] = down, up
    scale = alpha / R if alpha is not None else 1.0
    for n, m in enumerate((Q, K, V)):
        b.scales[m] = scale
        b.effects[m] = scale * (up[n * 3840:(n + 1) * 3840] @ (down @ probe(3840)))


# comfyanonymous/ComfyUI comfy_extras/nodes_lora_extract.py LoraSave: keys are the native model's
# weight names ("diffusion_model.layers.0.attention.qkv") + lora_up/lora_down, no alpha; 1-D weights
# (norms) and biases saved as .diff / .diff_b in the "full_diff" / bias_diff modes.
@builder("comfyui-extract")
def _comfy_extract(ix, probe):
    b = Built()
    _fused_qkv(b, ix, probe, "diffusion_model.layers.0.attention.qkv", ".lora_down.weight", ".lora_up.weight", None)
    _lora(b, ix, probe, OUT, "diffusion_model.layers.0.attention.out.lora_down.weight",
          "diffusion_model.layers.0.attention.out.lora_up.weight", alpha=None)
    diff = _rand(128)
    b.tensors["diffusion_model.layers.0.attention.q_norm.diff"] = diff
    b.scales["layers.0.attention.norm_q"] = 1.0
    b.effects["layers.0.attention.norm_q"] = diff
    return b


# ComfyUI comfy_extras/nodes_train.py TrainLoraNode.execute: for every module of the native model
# (n = "diffusion_model.layers.0.attention.qkv", ...) the comfy/weight_adapter/lora.py LoraDiff
# parameters as f"{n}.{name}": lora_up.weight, lora_down.weight, alpha (default 1.0, scale alpha/rank);
# 1-D weights (norms) as f"{n}.diff", biases as f"{n}.diff_b"; SaveLoRA writes the dict unchanged.
@builder("comfyui-train-node")
def _comfy_train(ix, probe):
    b = Built()
    _fused_qkv(b, ix, probe, "diffusion_model.layers.0.attention.qkv", ".lora_down.weight", ".lora_up.weight", 1.0)
    b.tensors["diffusion_model.layers.0.attention.qkv.alpha"] = torch.tensor(1.0)
    stem = "diffusion_model.layers.3.adaLN_modulation.0"
    _lora(b, ix, probe, ADA, stem + ".lora_down.weight", stem + ".lora_up.weight", alpha=1.0)
    b.tensors[stem + ".alpha"] = torch.tensor(1.0)
    b.tensors[stem + ".diff_b"] = b.biases[ADA] = _rand(15360)
    diff = _rand(128)
    b.tensors["diffusion_model.layers.0.attention.k_norm.diff"] = diff
    b.scales["layers.0.attention.norm_k"] = 1.0
    b.effects["layers.0.attention.norm_k"] = diff
    return b


# Civitai fused files (F9 in /work/shared/reference/adapter-formats.md): diffusion_model. + native
# fused names + lora_A/lora_B + .alpha, often with text-encoder keys beside them (kohya lora_te_ and
# ComfyUI's Qwen3 "text_encoders.qwen3_4b.transformer.model.layers.N" spelling).
@builder("civitai-fused-with-te")
def _civitai(ix, probe):
    b = Built()
    _fused_qkv(b, ix, probe, "diffusion_model.layers.0.attention.qkv", ".lora_A.weight", ".lora_B.weight", 8.0)
    b.tensors["diffusion_model.layers.0.attention.qkv.alpha"] = torch.tensor(8.0)
    _lora(b, ix, probe, XEMB, "diffusion_model.x_embedder.lora_A.weight", "diffusion_model.x_embedder.lora_B.weight",
          alpha=8.0)
    b.tensors["diffusion_model.x_embedder.alpha"] = torch.tensor(8.0)
    te = "lora_te_encoder_layers_0_self_attn_q_proj"
    b.tensors[te + ".lora_down.weight"], b.tensors[te + ".lora_up.weight"] = _rand(R, 2560), _rand(4096, R)
    qwen = "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj"
    b.tensors[qwen + ".lora_A.weight"], b.tensors[qwen + ".lora_B.weight"] = _rand(R, 2560), _rand(4096, R)
    return b


# -- diffusers ----------------------------------------------------------------------------------------
# huggingface/diffusers examples/dreambooth/train_dreambooth_lora_z_image.py: save_lora_weights with
# transformer. + PEFT lora_A/lora_B and lora_adapter_metadata {"r", "lora_alpha", ...}
# (--lora_alpha 8 here); text-encoder keys under text_encoder. when it is trained too.
@builder("diffusers-dreambooth")
def _diffusers(ix, probe):
    cfg = {"r": R, "lora_alpha": 8, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"], "use_rslora": False}
    b = Built(metadata={"lora_adapter_metadata": json.dumps({"transformer": cfg}), "format": "pt"})
    for m in (Q, K, V, OUT):
        _lora(b, ix, probe, m, f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", alpha=8.0)
    te = "text_encoder.layers.0.self_attn.q_proj"
    b.tensors[te + ".lora_A.weight"], b.tensors[te + ".lora_B.weight"] = _rand(R, 2560), _rand(4096, R)
    return b


# -- files people posted in load-failure reports -----------------------------------------------------
# huggingface/diffusers issue #13221 ("Zimage lora support issue too"): bare diffusers names with full
# LoKr factors, e.g. 'layers.8.attention.to_v.lokr_w1', '.lokr_w2', '.alpha' (LyCORIS rule: scale 1).
@builder("posted-bare-lokr")
def _posted_bare_lokr(ix, probe):
    b = Built()
    for m in (V, "layers.8.feed_forward.w3"):
        o, i = ix.shapes[m].shape
        w1 = _rand(60 if o == 3840 else 80, 60, scale=0.1)
        w2 = _rand(o // w1.shape[0], i // 60, scale=0.1)
        b.tensors |= {f"{m}.lokr_w1": w1, f"{m}.lokr_w2": w2, f"{m}.alpha": torch.tensor(1.0)}
        b.scales[m] = 1.0
        b.effects[m] = _kron_effect(w1, w2, 1.0, probe)
    return b


# shootthesound/comfyUI-Realtime-Lora issue #21: an ai-toolkit LyCORIS LoKr saved with the lycoris_
# prefix: 'lycoris_layers_0_attention_to_k.lokr_w1', '.lokr_w2', '.alpha'.
@builder("posted-ai-toolkit-lycoris-prefix")
def _posted_ai_toolkit_lycoris(ix, probe):
    b = Built()
    for m in (K, ADA):
        o, i = ix.shapes[m].shape
        w1 = _rand(64 if o == 15360 else 60, 16, scale=0.1)
        w2 = _rand(o // w1.shape[0], i // 16, scale=0.1)
        stem = "lycoris_" + _flat(m)
        b.tensors |= {stem + ".lokr_w1": w1, stem + ".lokr_w2": w2, stem + ".alpha": torch.tensor(9999999999.0)}
        b.scales[m] = 1.0
        b.effects[m] = _kron_effect(w1, w2, 1.0, probe)
    return b


# invoke-ai/InvokeAI pull request #8709: a Civitai DoRA with 'diffusion_model.layers.X.attention.to_k.
# lora_down.weight' / '.lora_up.weight' / '.alpha' / '.dora_scale' (LyCORIS shape (out, 1)).
@builder("posted-civitai-dora")
def _posted_civitai_dora(ix, probe):
    b = Built()
    stem = f"diffusion_model.{K}"
    _lora(b, ix, probe, K, stem + ".lora_down.weight", stem + ".lora_up.weight", alpha=4.0)
    b.tensors[stem + ".alpha"] = torch.tensor(4.0)
    b.tensors[stem + ".dora_scale"] = torch.rand(3840, 1, generator=_G) + 0.5
    return b


# Mixed files ("Anime-Z", F11 in /work/shared/reference/adapter-formats.md): kohya-flat split to_q/k/v
# and a fused qkv copy of them, dotted '.lora.down.weight' / '.lora.up.weight', '.alpha' each.
@builder("mixed-anime-z")
def _mixed(ix, probe):
    b = Built()
    down = _rand(R, 3840)
    ups = []
    for m in (Q, K, V):
        up = _rand(3840, R)
        ups.append(up)
        stem = "lora_unet_" + _flat(m)
        b.tensors |= {stem + ".lora.down.weight": down.clone(), stem + ".lora.up.weight": up,
                      stem + ".alpha": torch.tensor(2.0)}
        b.scales[m] = 2.0 / R
        b.effects[m] = 2.0 / R * (up @ (down @ probe(3840)))
    stem = "lora_unet_layers_0_attention_qkv"
    b.tensors |= {stem + ".lora.down.weight": down.clone(), stem + ".lora.up.weight": torch.cat(ups, 0),
                  stem + ".alpha": torch.tensor(2.0)}
    return b
