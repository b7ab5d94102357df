"""`TokenizeConfig`: the typed config of `t2i tokenize` (loaded with `data_pipeline.config.load_config`).

t2i tokenize --config jobs/configs/tokenize_digits.yaml image_tokenizer.batch_size=128
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline.clip_score import OpenClipSection
from data_pipeline.config import (
    REQUIRED,
    ActorPoolSection,
    ConfigError,
    RayConfig,
    StorageConfig,
)


@dataclass
class TextTokenizerSection:
    """How captions become `text_tokens` (see `data_pipeline.text_tokens`)."""

    kind: Literal["bpe", "open_clip"] = "bpe"  # ldm: open_clip (the text encoder's own ids)
    vocab_size: int = 1024  # bpe: the model's text vocabulary; ids lie in [0, vocab_size)
    text_len: int = 16  # ids per caption: truncated, right-padded with 0
    lowercase: bool = True  # bpe: lowercase captions before training and encoding
    train_shards: int = 0  # bpe: train on the captions of the first N input shards; 0: all
    # bpe: train on at most this many of those captions, a uniform sample (the lowest hashes of
    # shard index + position: deterministic); bounds the driver's memory on any data size
    train_captions: int = 500_000
    path: str = ""  # reuse this tokenizer file (e.g. another dataset's) instead of building one


@dataclass
class ImageTokenizerSection(ActorPoolSection):
    """The dVAE / VQGAN (ar) or KL-AE (ldm) that encodes images, run on a Ray actor pool
    (`batch_size` images per forward pass, the pool's resources: see `ActorPoolSection`)."""

    # tokenizer directory, a `t2i train` run, a `t2i convert` output, or a diffusers VAE folder;
    # required unless `pretrained:` names a pipeline folder (its `vae/` is used)
    path: str = ""


@dataclass
class TextEncoderSection(ActorPoolSection, OpenClipSection):
    """recipe=ldm: the open_clip text tower whose per-token states condition the U-Net (`model`,
    `model_config`: see `OpenClipSection`), run on a Ray actor pool (`batch_size` captions per
    forward pass, the pool's resources: see `ActorPoolSection`)."""

    checkpoint: str = ""  # open_clip checkpoint, local or s3://; "": random (needs allow_random)
    # what the weights were trained with: auto (read from the checkpoint; see preprocess's clip)
    checkpoint_activation: Literal["auto", "gelu", "quick_gelu"] = "auto"
    allow_random: bool = False  # an empty checkpoint is refused unless this says so (tests, demo)


@dataclass
class TokenizeConfig:
    """`t2i tokenize`: clean shards -> token dataset (ar) or latent dataset (ldm)."""

    input: str | list[str] = REQUIRED  # clean shards: dir, shard, glob or a list (local or s3://)
    output: str = REQUIRED  # dataset dir or s3://bucket/prefix; a rerun resumes what is there
    recipe: Literal["ar", "ldm"] = "ar"  # ar: BPE + image codes; ldm: latents + text embeddings
    image_size: int = 256  # images are resized (shorter side) and centre-cropped to this square
    rows_per_shard: int = 0  # rows per output Parquet file; 0: one file per input shard
    decode_batch_size: int = 64  # rows per CPU decode task batch
    max_pixels: int = 89_478_485  # decoded width*height above this quarantines the sample
    keep_work: bool = False  # keep `_work/` (encoded parts) after success, for debugging
    # recipe=ldm: a diffusers Stable Diffusion pipeline folder (local or s3://) whose `vae/`,
    # `text_encoder/` and `tokenizer/` encode images and captions as its pipeline does
    # (text_tokenizer and text_encoder model settings are then not used)
    pretrained: str = ""
    # recipe=ldm: what the rows carry for the caption. states: the text encoder's per-token
    # states (L x D fp16; 154 KiB a row for SD 2's 77 x 1024); tokens: only the ids
    # (`text_tokens`, L int32), the same frozen encoder runs on the training workers each step
    text: Literal["states", "tokens"] = "states"
    # recipe=ldm: also encode the horizontally mirrored image (`latent_flip`), so that training
    # can flip at random (`ldm.random_flip`) with the autoencoder's own latent of the mirror
    flip: bool = False
    # recipe=ldm: aspect-ratio buckets (`data_pipeline/tokenize/buckets.py`): each image goes to
    # the (H, W) nearest its aspect ratio, sides multiples of bucket_step, H*W <= image_size**2,
    # sides at most bucket_max_ratio apart; resized to cover it, centre-cropped. false: squares
    buckets: bool = False
    bucket_step: int = 64  # bucket sides are multiples of this (of the autoencoder's factor too)
    bucket_max_ratio: float = 2.0  # longest side / shortest side of a bucket, at most
    text_tokenizer: TextTokenizerSection = field(default_factory=TextTokenizerSection)
    image_tokenizer: ImageTokenizerSection = field(default_factory=ImageTokenizerSection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def check_config(cfg: TokenizeConfig) -> None:
    """Cross-field checks, run once after overrides (a half-applied override list may be
    inconsistent, so these do not live in `__post_init__`)."""
    e = cfg.text_encoder
    if (
        cfg.recipe == "ldm"
        and not e.checkpoint
        and not getattr(cfg, "pretrained", "")  # a pipeline folder brings its own encoder
        and not e.allow_random
    ):
        raise ConfigError(
            "text_encoder.checkpoint is empty: the text encoder would have RANDOM weights and "
            "the latent dataset's text states would mean nothing; name a checkpoint, or set "
            "text_encoder.allow_random=true (tests, demos)"
        )
    if cfg.pretrained and cfg.recipe != "ldm":
        raise ConfigError("pretrained: a pipeline folder is for recipe=ldm")
    if cfg.text == "tokens" and cfg.recipe != "ldm":
        raise ConfigError("text=tokens is for recipe=ldm (recipe=ar rows hold only ids anyway)")
    for key in ("flip", "buckets"):
        if getattr(cfg, key) and cfg.recipe != "ldm":
            raise ConfigError(f"{key}=true is for recipe=ldm (latent datasets)")
    if cfg.buckets:
        from data_pipeline.tokenize.buckets import compute_buckets

        try:
            compute_buckets(cfg.image_size, cfg.bucket_step, cfg.bucket_max_ratio)
        except ValueError as e:
            raise ConfigError(f"buckets: {e}") from None
    if not cfg.image_tokenizer.path and not cfg.pretrained:
        raise ConfigError(
            "missing required value 'image_tokenizer.path' (or, recipe=ldm, `pretrained:` a "
            "Stable Diffusion pipeline folder)"
        )
    if cfg.recipe == "ldm" and not cfg.pretrained and cfg.text_tokenizer.kind != "open_clip":
        raise ConfigError(
            "text_tokenizer.kind must be open_clip when recipe=ldm (the text encoder reads "
            "open_clip ids)"
        )
    for key in ("image_size", "decode_batch_size", "max_pixels"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.text_tokenizer.train_captions < 1:
        raise ConfigError(
            f"text_tokenizer.train_captions must be >= 1, got {cfg.text_tokenizer.train_captions}"
        )
    if cfg.rows_per_shard < 0:
        raise ConfigError(f"rows_per_shard must be >= 0, got {cfg.rows_per_shard}")
    for sec in ("image_tokenizer", "text_encoder"):
        s = getattr(cfg, sec)
        if s.batch_size < 1 or s.concurrency < 1:
            raise ConfigError(f"{sec}.batch_size and {sec}.concurrency must be >= 1")
