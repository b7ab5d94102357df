"""`PreprocessConfig`: the typed config of `t2i preprocess` (validate, filter, CLIP-score, dedup).

t2i preprocess --config jobs/configs/preprocess_digits.yaml output=runs/clean
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
from data_pipeline.filters import FieldFilter


@dataclass
class PreprocessValidateSection:
    """Hostile-input limits of `t2i preprocess`: breaking one quarantines that sample only."""

    max_pixels: int = (
        89_478_485  # width*height from the image header above this: decompression bomb
    )
    max_member_bytes: int = 64 * 1024 * 1024  # one tar member larger than this is not read
    max_caption_bytes: int = 4096  # UTF-8 bytes; longer captions are quarantined
    image_extensions: list[str] = field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp"]
    )  # in order of preference when a sample holds several
    caption_extensions: list[str] = field(default_factory=lambda: ["txt", "caption"])
    unsafe_extensions: list[str] = field(
        default_factory=lambda: ["pkl", "pickle", "pth", "pt", "ckpt", "bin", "joblib"]
    )  # pickle-capable formats: the sample is quarantined, the member never deserialized
    # (.npy/.npz members are inspected safely: object dtype, i.e. pickle, is quarantined)


@dataclass
class PreprocessFilterSection:
    """Curation filters applied to samples that passed validation."""

    min_side: int = 0  # shorter image side in pixels; 0 disables
    max_aspect_ratio: float = 0.0  # long side / short side; 0 disables
    min_caption_words: int = 0  # whitespace-separated words; 0 disables
    max_caption_words: int = 0  # 0 disables
    # filters on the fields samples bring (.json / parquet sidecar), all must pass, e.g.
    # [{field: punsafe, op: "<", value: 0.1}, {field: similarity, op: ">=", value: 0.28}]
    fields: list[FieldFilter] = field(default_factory=list)


@dataclass
class PreprocessClipSection(ActorPoolSection, OpenClipSection):
    """CLIP scoring: cosine(image, text) from an open_clip model (`model`, `model_config`: see
    `OpenClipSection`), run on a Ray actor pool (`batch_size` images per forward pass, the pool's
    resources: see `ActorPoolSection`)."""

    enabled: bool = True  # False: no score filter and no near-duplicate detection
    # open_clip/OpenAI weights (.safetensors/.pt/.bin), local or s3:// (fetched once per node);
    # "": random weights (tests, benchmarks)
    checkpoint: str = ""
    # what the weights were trained with: auto (read it from the checkpoint; an OpenAI-layout file
    # that does not say is refused under a GELU model), gelu or quick_gelu (OpenAI's weights)
    checkpoint_activation: Literal["auto", "gelu", "quick_gelu"] = "auto"
    threshold: float = 0.28  # keep cosine >= threshold (LAION-400M's value for ViT-B/32)


@dataclass
class PreprocessDedupSection:
    """Exact (decoded pixels) and near (CLIP image embedding) duplicate removal."""

    exact: bool = True  # drop samples whose decoded pixels equal a smaller key's
    near: bool = True  # drop samples whose embedding cosine >= near_threshold to a kept one
    near_threshold: float = 0.96
    lsh_bands: int = 8  # random-hyperplane LSH: tables; more bands find more pairs, cost more
    lsh_bits: int = 10  # hyperplanes per band; more bits give smaller buckets
    seed: int = 0  # seeds the hyperplanes (the result is deterministic for a seed)


@dataclass
class PreprocessConfig:
    """`t2i preprocess`: validated, filtered, deduplicated WebDataset shards from raw ones."""

    input: str | list[str] = REQUIRED  # dir, shard, glob (s3://b/p/*.tar) or a list of them
    output: str = REQUIRED  # output dir or s3://bucket/prefix; a rerun resumes what is there
    max_bad_fraction: float = 0.05  # fail if validation quarantines more than this fraction
    decode_batch_size: int = 64  # rows per CPU decode task batch
    keep_work: bool = False  # keep the `_work/` intermediates after success (debugging)
    validate: PreprocessValidateSection = field(default_factory=PreprocessValidateSection)
    filters: PreprocessFilterSection = field(default_factory=PreprocessFilterSection)
    clip: PreprocessClipSection = field(default_factory=PreprocessClipSection)
    dedup: PreprocessDedupSection = field(default_factory=PreprocessDedupSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def check_config(cfg: PreprocessConfig) -> None:
    """Cross-field checks, run once after overrides; errors name the key."""
    for i, f in enumerate(cfg.filters.fields):
        try:
            f.check(f"filters.fields[{i}]")
        except ValueError as e:
            raise ConfigError(str(e)) from None
