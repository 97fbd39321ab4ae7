"""Adapter files with text-encoder and transformer parts, in the three text-encoder spellings trainers
write, plus the outputs and snapshots the pipeline tests compare.

Spellings (prefix + module name of the Qwen3 text encoder):
- kohya / musubi-tuner: `lora_te_` + the module name with dots as underscores, as its networks name
  modules (`lora_te_layers_0_self_attn_q_proj`; a file trained on `Qwen3ForCausalLM` carries
  `lora_te_model_layers_...`), `.lora_down/.lora_up/.alpha`;
- ComfyUI: `text_encoders.qwen3_4b.transformer.` + the Hugging Face state-dict name (ComfyUI wraps
  the model, so `model.layers.N`), `.lora_down/.lora_up` without alpha, as its LoRA extract node saves;
- diffusers / PEFT: `text_encoder.` + the PEFT module name, `.lora_A/.lora_B`, with alpha and rank
  in `lora_adapter_metadata` packed per component (`text_encoder.lora_alpha`, `transformer.r`, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 4
TE_TARGETS = ("layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.mlp.down_proj")
TR_TARGETS = ("layers.0.attention.to_q", "layers.1.feed_forward.w2")
SPELLINGS = ("kohya", "kohya_causal_lm", "comfyui", "diffusers")


def factors(model: torch.nn.Module, targets, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) per module, scaled so each delta is a visible fraction of the weight."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in targets:
        m = model.get_submodule(name)
        down = torch.randn(RANK, m.in_features, generator=g) / m.in_features**0.5
        up = torch.randn(m.out_features, RANK, generator=g) * 0.2
        out[name] = (down, up)
    return out


def te_scale(spelling: str) -> float:
    """alpha / rank the file's text-encoder part carries (ComfyUI's extract node writes no alpha)."""
    return 1.0 if spelling == "comfyui" else 8.0 / RANK


TR_ALPHA = 2.0


def write(path: Path, spelling: str, te: dict | None, tr: dict | None) -> Path:
    """One file in `spelling` with the text-encoder factors `te` and the transformer factors `tr`."""
    sd: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for name, (down, up) in (te or {}).items():
        if spelling == "kohya":
            stem = "lora_te_" + name.replace(".", "_")
        elif spelling == "kohya_causal_lm":
            stem = "lora_te_model_" + name.replace(".", "_")
        elif spelling == "comfyui":
            stem = "text_encoders.qwen3_4b.transformer.model." + name
        else:
            stem = "text_encoder." + name
        if spelling == "diffusers":
            sd[stem + ".lora_A.weight"], sd[stem + ".lora_B.weight"] = down, up
        else:
            sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = down, up
        if spelling.startswith("kohya"):
            sd[stem + ".alpha"] = torch.tensor(8.0)
    for name, (down, up) in (tr or {}).items():
        if spelling.startswith("kohya"):
            stem = "lora_unet_" + name.replace(".", "_")
            sd[stem + ".alpha"] = torch.tensor(TR_ALPHA)
        elif spelling == "comfyui":
            stem = "diffusion_model." + name
            sd[stem + ".alpha"] = torch.tensor(TR_ALPHA)
        else:
            stem = "transformer." + name
        if spelling == "diffusers":
            sd[stem + ".lora_A.weight"], sd[stem + ".lora_B.weight"] = down, up
        else:
            sd[stem + ".lora_down.weight"], sd[stem + ".lora_up.weight"] = down, up
    if spelling == "diffusers":
        doc = {"text_encoder.r": RANK, "text_encoder.lora_alpha": 8, "transformer.r": RANK,
               "transformer.lora_alpha": TR_ALPHA}
        meta["lora_adapter_metadata"] = json.dumps(doc)
    save_file(sd, str(path), metadata=meta or None)
    return path


def token_inputs(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def te_output(te: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Every hidden state (the pipeline reads hidden_states[-2]), stacked."""
    return torch.stack(te(**inputs, output_hidden_states=True).hidden_states)


def patched(model: torch.nn.Module, deltas: list[tuple[str, tuple[torch.Tensor, torch.Tensor], float]]):
    """A copy of `model` with W += s * up @ down written straight into the weights (fp32)."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, (down, up), s in deltas:
            w = ref.get_submodule(name).weight
            w += s * (up @ down)
    return ref
