"""Tiny random Z-Image pipelines (every class), built offline: tiny transformer, VAE, Qwen3 text encoder
and a word-level tokenizer with the chat template the pipeline applies (plus a tiny ControlNet or
SigLIP2 where the class has one). For the tests of
`generate`; its images are noise, but every component runs the real code."""

from __future__ import annotations

from pathlib import Path

import torch

from zimage_lora.apply.components import PIPELINE_CLASSES
from zimage_lora.examples import tiny_config, tiny_model

# ChatML, as Qwen3 tokenizers spell it (the pipeline calls apply_chat_template(..., enable_thinking=True)).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "a an the of at in on with and lighthouse dusk cat dog red blue green house tree sky sea mountain "
    "portrait photo painting style night day user assistant"
).split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


#: Every Z-Image pipeline class in diffusers; `tiny_pipeline(kind=...)` builds any of them.
PIPELINES = PIPELINE_CLASSES
SIGLIP_DIM = 32


def tiny_text_encoder(vocab_size: int, hidden_size: int, seed: int = 0):
    """A tiny random `Qwen3Model` (2 layers, 2 heads, 1 kv head): the class Z-Image pipelines load."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
    )).eval()


def _siglip():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    try:  # the PIL processor: the default one wants torchvision and warns without it
        from transformers import Siglip2ImageProcessorPil as Processor
    except ImportError:
        from transformers import Siglip2ImageProcessor as Processor
    model = Siglip2VisionModel(Siglip2VisionConfig(
        hidden_size=SIGLIP_DIM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        patch_size=8, num_patches=16,
    )).eval()
    return model, Processor(patch_size=8, max_num_patches=16)


def _controlnet(cfg: dict, inpaint: bool):
    from diffusers import ZImageControlNetModel

    # The inpaint ControlNet (Union 2.0) also takes the masked image's latents and the mask.
    in_dim = 2 * cfg["in_channels"] + 1 if inpaint else cfg["in_channels"]
    return ZImageControlNetModel(
        control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=in_dim,
        all_patch_size=cfg["all_patch_size"], all_f_patch_size=cfg["all_f_patch_size"], dim=cfg["dim"],
        n_refiner_layers=cfg["n_refiner_layers"], n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"],
    ).eval()


def tiny_pipeline(seed: int = 0, kind: str = "ZImagePipeline"):
    """A Z-Image pipeline of class `kind` (one of `PIPELINES`) of tiny random components (text width 32,
    transformer width 64). ControlNet kinds add a tiny ControlNet; Omni a tiny SigLIP2 and a transformer
    with its SigLIP refiner (`siglip_feat_dim` set)."""
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    if kind not in PIPELINES:
        raise ValueError(f"unknown pipeline {kind!r}; known: {', '.join(PIPELINES)}")
    cfg = tiny_config()
    tokenizer = tiny_tokenizer()
    text_encoder = tiny_text_encoder(len(tokenizer), cfg["cap_feat_dim"], seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg["in_channels"], block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    omni = kind == "ZImageOmniPipeline"
    transformer = tiny_model(seed=seed, **({"siglip_feat_dim": SIGLIP_DIM} if omni else {}))
    extra: dict = {}
    if "ControlNet" in kind:
        extra["controlnet"] = _controlnet(cfg, inpaint="Inpaint" in kind)
    if omni:
        extra["siglip"], extra["siglip_processor"] = _siglip()
    return getattr(diffusers, kind)(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        **extra,
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0, kind: str = "ZImagePipeline") -> Path:
    """Write the tiny pipeline with `save_pretrained` (a folder `from_pretrained` reads offline)."""
    folder = Path(folder)
    tiny_pipeline(seed, kind).save_pretrained(folder)
    return folder
