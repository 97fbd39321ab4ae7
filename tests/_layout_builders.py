"""Builders for tests/test_real_layouts.py: each writes the keys, dtypes and metadata one trainer's
saving code produces (provenance above each builder), and computes with that trainer's own formula
the scale and the effect on a probe vector each module was trained with.

Module names are diffusers' (`index.shapes`); shapes are the full Z-Image-Turbo ones, rank 4.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

R = 4
Q, K, V = "layers.0.attention.to_q", "layers.0.attention.to_k", "layers.0.attention.to_v"
OUT, W1, W2 = "layers.0.attention.to_out.0", "layers.1.feed_forward.w1", "layers.29.feed_forward.w2"
ADA, CAP = "layers.3.adaLN_modulation.0", "cap_embedder.1"
FINAL, XEMB = "all_final_layer.2-1.linear", "all_x_embedder.2-1"


@dataclass
class Built:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # module -> trained scale
    effects: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> trained delta @ probe


BUILDERS: dict[str, Callable] = {}
_G = torch.Generator().manual_seed(0)


def builder(name: str):
    def register(fn):
        BUILDERS[name] = fn
        return fn

    return register


def _rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
    return torch.randn(*shape, generator=_G) * scale


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _lora(b: Built, ix, probe, module: str, down_key: str, up_key: str, *, alpha: float | None,
          scale: float | None = None, dtype=torch.float32, fold: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained LoRA (down, up) for `module` at scale alpha/R (1 without alpha); `fold` is multiplied
    into both saved factors (musubi convert_lora.py bakes sqrt(alpha/rank) into each)."""
    o, i = ix.shapes[module].shape
    down, up = _rand(R, i), _rand(o, R)
    trained = (alpha / R) if alpha is not None else 1.0
    b.tensors[down_key] = (down * fold).to(dtype)
    b.tensors[up_key] = (up * fold).to(dtype)
    b.scales[module] = trained if scale is None else scale
    b.effects[module] = trained * (up.to(dtype).float() @ (down.to(dtype).float() @ probe(i)))
    return down, up


def _kron_effect(w1: torch.Tensor, w2: torch.Tensor, scale: float, probe) -> torch.Tensor:
    d = torch.kron(w1.float(), w2.float())
    return scale * (d @ probe(d.shape[1]))


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


# ComfyUI comfy_extras/nodes_train.py TrainLoraNode saving comfy/weight_adapter/lora.py LoraDiff
# parameters under the native weight name: lora_up.weight, lora_down.weight, alpha (scale alpha/rank).
@builder("comfyui-train-node")
def _comfy_train(ix, probe):
    b = Built()
    _fused_qkv(b, ix, probe, "diffusion_model.layers.0.attention.qkv", ".lora_down.weight", ".lora_up.weight", 1.0)
    b.tensors["diffusion_model.layers.0.attention.qkv.alpha"] = torch.tensor(1.0)
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
