"""A tiny random Stable Diffusion pipeline folder, built locally (no downloads): a small
UNet2DConditionModel, AutoencoderKL, CLIPTextModel + CLIPTokenizer (a byte-level vocabulary
written here) and a DDIM scheduler, saved with `save_pretrained` as diffusers lays it out."""

from __future__ import annotations

import json
import os

TEXT_WIDTH = 32
TEXT_LEN = 16
LATENT_CHANNELS = 4
IMAGE_SIZE = 16  # VAE f=2: 8x8 latents


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(folder: str) -> None:
    """A CLIPTokenizer folder: every byte symbol alone and word-final, a few merges."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "d i", "di g", "dig i", "digi t</w>"]
    vocab += [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        model_max_length=TEXT_LEN,
        pad_token="!",  # SD-2's tokenizer pads with "!" (id 0), SD-1's with <|endoftext|>
    )
    tok.save_pretrained(folder)


def build_tiny_sd(folder: str, *, seed: int = 0, safe: bool = True):
    """Write a tiny SD pipeline to `folder`; return the StableDiffusionPipeline."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_head_dim=(2, 4),
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=0.5,
    )
    tok_dir = os.path.join(folder, "tokenizer")
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_LEN,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder, safe_serialization=safe)
    return pipe


if __name__ == "__main__":  # a tiny random pipeline to try the README's SD commands with
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.trainer.sd_fixtures OUT_DIR")
    build_tiny_sd(sys.argv[1])
    print(f"tiny Stable Diffusion pipeline (random weights) in {sys.argv[1]}")
