"""`t2i sample`'s typed config (both recipes) and its prompt list.

    t2i sample --config jobs/configs/sample_digits.yaml [sample.prompts='["the number 7"]']
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from data_pipeline import fs
from data_pipeline.clip_score import OpenClipSection
from data_pipeline.config import REQUIRED, RayConfig, StorageConfig


@dataclass
class SamplingSection:
    """What to sample and how."""

    prompts: list[str] = field(default_factory=list)  # text prompts (or use prompts_file)
    # UTF-8 file, one prompt per line ('#' comments); local or s3://. When set it replaces
    # `prompts` (so `sample.prompts_file=...` on the command line overrides a config's list).
    prompts_file: str = ""
    candidates: int = 8  # images sampled per prompt, reranked by CLIP
    keep: int = 2  # best-scoring candidates written per prompt (<= candidates)
    temperature: float = 1.0  # softmax temperature; 0 = greedy (argmax, no randomness)
    top_k: int = 0  # sample among the k most likely codes; 0 = off
    top_p: float = 1.0  # nucleus: smallest set of codes with probability >= top_p; 1 = off
    seed: int = 0  # base seed; each candidate derives its own (see candidate_seed)
    batch_size: int = 64  # candidates generated together (one unit of work for a worker)
    workers: int = 1  # Ray actors sharing the candidates (each loads the models once)
    # recipe=ldm: the reverse process
    scheduler: Literal["ddim", "ddpm"] = "ddim"  # diffusers' DDIM (eta below) or DDPM
    steps: int = 50  # denoising steps
    guidance: float = 3.0  # classifier-free guidance scale s; 1: conditional prediction only
    eta: float = 0.0  # DDIM: 0 deterministic given the initial noise, 1 DDPM-like


@dataclass
class RerankClipSection(OpenClipSection):
    """The CLIP model that scores candidates: an open_clip architecture (`model`, `model_config`:
    see `OpenClipSection`) + local weights."""

    model: str = "clip_digits_tiny"
    model_config: str = "jobs/configs/clip_digits_tiny.json"
    enabled: bool = True  # False: keep the first `keep` candidates, clip_score is null
    # `t2i train` CLIP run or checkpoint dir (its model.safetensors), or an open_clip checkpoint
    # file; local or s3:// (fetched once per node). "": random weights: scores mean nothing, so
    # refused unless allow_random (tests, benchmarks).
    checkpoint: str = ""
    allow_random: bool = False
    # what the weights were trained with: auto (read from the checkpoint; an OpenAI-layout file
    # that does not say is refused under a GELU model), gelu or quick_gelu (OpenAI's weights)
    checkpoint_activation: Literal["auto", "gelu", "quick_gelu"] = "auto"
    batch_size: int = 64  # images per CLIP forward pass


@dataclass
class SampleConfig:
    """`t2i sample`: a trained text-to-image model -> reranked images, samples.jsonl, grid.png."""

    # "ar": DALL-E transformer over image-tokenizer codes; "ldm": U-Net over KL-AE latents
    recipe: Literal["ar", "ldm"] = "ar"
    model: str = REQUIRED  # `t2i train` run dir (newest exported checkpoint) or checkpoint dir
    # Its token (ar) or latent (ldm) dataset: the text tokenizer for the prompts comes from it.
    # recipe=ldm with a diffusers pipeline folder as `model` (model_index.json: an export of
    # ours or a released one): not used, the folder brings tokenizer, text encoder and VAE.
    tokens: str = ""
    image_tokenizer: str = ""  # decodes codes / latents to pixels (run, ckpt or convert dir)
    # recipe=ldm: the open_clip text encoder's checkpoint; "": the one the dataset manifest
    # records. Either way its sha256 must match the manifest's.
    text_encoder: str = ""
    output: str = REQUIRED  # output dir or s3://bucket/prefix (files are overwritten)
    sample: SamplingSection = field(default_factory=SamplingSection)
    clip: RerankClipSection = field(default_factory=RerankClipSection)
    # transformer dtype; auto: bf16 where the hardware has it (GPU, AVX512-BF16/AMX), else fp32
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    grid_cell: int = 96  # min side of one image in grid.png (upscaled by an integer factor)
    num_cpus: float = 2.0  # the Ray task's CPUs (and torch threads)
    num_gpus: float = 0.0  # GPUs per sampling actor, requested as given (0: CPU; see devices.py)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def check_config(cfg: SampleConfig) -> None:
    """Raise ValueError naming the first inconsistent sampling value."""
    if cfg.clip.enabled and not cfg.clip.checkpoint and not cfg.clip.allow_random:
        raise ValueError(
            "clip.checkpoint is empty: the reranking CLIP would have RANDOM weights and its "
            "scores would mean nothing; name a checkpoint, set clip.enabled=false, or set "
            "clip.allow_random=true (tests, benchmarks)"
        )
    for key in ("tokens", "image_tokenizer"):
        if cfg.recipe == "ar" and not getattr(cfg, key):
            raise ValueError(f"missing required value '{key}' (recipe=ar)")
    s = cfg.sample
    if s.candidates < 1 or not 1 <= s.keep <= s.candidates:
        raise ValueError(
            f"sample.keep must be in [1, sample.candidates={s.candidates}], got {s.keep}"
        )
    if s.temperature < 0:
        raise ValueError(f"sample.temperature must be >= 0, got {s.temperature}")
    if s.top_k < 0:
        raise ValueError(f"sample.top_k must be >= 0, got {s.top_k}")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"sample.top_p must be in (0, 1], got {s.top_p}")
    if s.batch_size < 1 or s.workers < 1:
        raise ValueError(
            f"sample.batch_size and sample.workers must be >= 1, got {s.batch_size}, {s.workers}"
        )
    if cfg.recipe == "ldm" and (s.steps < 1 or s.guidance < 0 or not 0.0 <= s.eta <= 1.0):
        raise ValueError(
            f"recipe=ldm needs sample.steps >= 1, sample.guidance >= 0 and sample.eta in [0, 1], "
            f"got {s.steps}, {s.guidance}, {s.eta}"
        )
    if not s.prompts and not s.prompts_file:
        raise ValueError("no prompts: set sample.prompts or sample.prompts_file")


def read_prompts(cfg: SampleConfig) -> list[str]:
    """`sample.prompts_file`'s lines (blank and '#' lines skipped) if set, else `sample.prompts`."""
    s = cfg.sample
    if not s.prompts_file:
        prompts = [str(p) for p in s.prompts]
    else:
        loc = fs.resolve(s.prompts_file, storage=cfg.storage)
        lines = fs.read_bytes(loc).decode("utf-8").splitlines()
        prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not prompts:
            raise ValueError(f"sample.prompts_file {loc.uri}: no prompts in the file")
    if any(not p.strip() for p in prompts):
        raise ValueError("sample.prompts: empty prompt")
    return prompts
