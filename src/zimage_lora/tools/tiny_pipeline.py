"""A tiny random Z-Image pipeline, built offline: tiny transformer, VAE, Qwen3 text encoder and a
word-level tokenizer with the chat template the pipeline applies. For tests and quick checks of
`generate`; its images are noise, but every component runs the real code."""

from __future__ import annotations

from pathlib import Path

import torch

from ..examples import tiny_config, tiny_model

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


def tiny_pipeline(seed: int = 0):
    """A `ZImagePipeline` of tiny random components (text width 32, transformer width 64)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    cfg = tiny_config()
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=cfg["cap_feat_dim"], intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg["in_channels"], block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    transformer = tiny_model(seed=seed)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline with `save_pretrained` (a folder `from_pretrained` reads offline)."""
    folder = Path(folder)
    tiny_pipeline(seed).save_pretrained(folder)
    return folder
