"""Latent-diffusion sampling: diffusers' DDIM / DDPM schedulers, classifier-free guidance.

    z_T ~ N(0, I) from a seeded generator
    for t in the scheduler's timesteps:
        ε_c, ε_u = U-Net(z_t, t, text), U-Net(z_t, t, empty caption)     (one batched forward)
        ε̂ = ε_u + s (ε_c − ε_u)                                          (s = 1: ε_c alone)
        z_{t-1} = scheduler.step(ε̂, t, z_t)                               (DDIM η, or DDPM)
    images = KL-AE decode(z_0)

`predict(z, t, text, mask)` is any callable returning the model output (ε or v, whichever the
scheduler's `prediction_type` says): the bare U-Net, a DeepSpeed engine's module, or a test double.
All noise comes from CPU `torch.Generator`s — one per candidate in `t2i sample`, so an image
depends on its own seed only, not on its batch — and gives the same latents on any device.

`LdmGenerator` is the recipe behind `t2i sample recipe=ldm`: prompts are tokenized and encoded by
the text encoder the latent dataset was built with (path + sha256 checked against its manifest),
the U-Net is the run's exported EMA weights, the dataset's KL-AE decodes. With a diffusers pipeline
folder as `model` (model_index.json: our export, or a released Stable Diffusion), everything comes
from the folder and runs as `StableDiffusionPipeline` runs it: its tokenizer and text encoder (no
mask), `unet/`, `vae/`, and `scheduler/`'s training schedule with `sample.scheduler`'s sampler.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from data_pipeline import fs
from data_pipeline.config import StorageConfig
from trainer.diffusion import compute_guided
from trainer.engine import DTYPES, resolve_precision
from trainer.pretrained.clip_models import ClipSpec, fetch_weights
from trainer.sampling.common import (
    Candidates,
    Chunk,
    candidate_seed,
    check_same_tokenizer,
    generate_all,
    load_exported,
    to_uint8,
)
from trainer.sampling.config import SampleConfig

SchedulerKind = Literal["ddim", "ddpm"]


def build_scheduler(kind: SchedulerKind, config: dict):
    """A fresh diffusers scheduler from the training schedule's config (`scheduler_config`)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "ddim":
        return DDIMScheduler(**config, set_alpha_to_one=False)  # SD's DDIM setting
    if kind == "ddpm":
        return DDPMScheduler(**config)
    raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {kind!r}")


@torch.no_grad()
def sample_latents(
    predict: Callable[..., torch.Tensor],
    scheduler,
    text: torch.Tensor,  # (B, L, D) conditional text states
    text_mask: torch.Tensor | None,  # (B, L) bool; None: no mask (SD's conditioning)
    uncond: torch.Tensor,  # (L, D) empty-caption states
    uncond_mask: torch.Tensor | None,  # (L,) bool
    *,
    latent_shape: tuple[int, int, int],  # (C, h, w)
    steps: int,
    guidance: float,
    generator: torch.Generator | list[torch.Generator],  # one, or one per row
    eta: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(B, C, h, w) float32 latents (still scaled: divide by the scaling factor to decode)."""
    b = text.shape[0]
    device = text.device
    scheduler.set_timesteps(steps)
    if isinstance(generator, list):
        z = torch.stack([torch.randn(latent_shape, generator=g) for g in generator])
    else:
        z = torch.randn((b, *latent_shape), generator=generator, dtype=torch.float32)
    z = (z * scheduler.init_noise_sigma).to(device)
    guided = guidance != 1.0
    if guided:  # one batch: conditional rows, then unconditional rows
        text = torch.cat([text, uncond.to(text).expand(b, -1, -1)])
        if text_mask is not None:
            text_mask = torch.cat([text_mask, uncond_mask.to(text_mask).expand(b, -1)])
    step_kwargs = {"eta": eta} if "eta" in _step_params(scheduler) else {}
    for t in scheduler.timesteps:
        model_in = torch.cat([z, z]) if guided else z
        ts = torch.full((model_in.shape[0],), int(t), dtype=torch.long, device=device)
        out = predict(model_in.to(dtype), ts, text.to(dtype), text_mask).float()
        if guided:
            out = compute_guided(out[b:], out[:b], guidance)
        # The scheduler's own noise (DDPM, DDIM with eta > 0) comes from the CPU generator(s) too
        # (diffusers draws row i from generator[i] when given a list).
        z = scheduler.step(out.cpu(), t, z.cpu(), generator=generator, **step_kwargs).prev_sample
        z = z.to(device)
    return z


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


def load_ldm(path: str, storage: StorageConfig, device: str = "cpu"):
    """(Unet with the exported EMA weights, in eval mode; its TrainConfig; the empty-caption
    states {text_embedding (L, D), text_mask (L,)}) from a run or exported checkpoint dir."""
    from safetensors.numpy import load

    from data_pipeline import token_dataset as T
    from trainer.models.image_tokenizer import WEIGHTS, load_strict
    from trainer.models.unet import Unet, add_lora, shape_of

    src, train_cfg, state = load_exported(path, storage, "ldm", "latent-diffusion model")
    if train_cfg.ldm.init_from:  # a released U-Net's shape: its config.json, exported in unet/
        config = json.loads(fs.read_bytes(src.join("unet/config.json")))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        model = Unet(shape_of(config, train_cfg.unet), config)
    else:
        model = Unet(train_cfg.unet)
    if train_cfg.ldm.lora_rank:
        add_lora(model, train_cfg.ldm.lora_rank, train_cfg.ldm.lora_alpha)
    load_strict(model, state, what=src.join(WEIGHTS).uri, layout="Unet")
    uncond = load(fs.read_bytes(src.join(T.EMPTY_CAPTION_FILE)))
    uncond = {T.TEXT_EMBEDDING: uncond[T.TEXT_EMBEDDING].astype(np.float32),
              T.TEXT_MASK: uncond[T.TEXT_MASK].astype(bool)}  # fmt: skip
    return model.to(device).eval(), train_cfg, uncond


def is_pipeline(path: str, storage: StorageConfig) -> bool:
    """Whether `path` is a diffusers pipeline folder (holds model_index.json)."""
    return fs.exists(fs.resolve(path, storage=storage).join("model_index.json"))


def text_encoder_checkpoint(cfg: SampleConfig, manifest: dict) -> str:
    """The text encoder's local checkpoint: `cfg.text_encoder` or the manifest's, with the
    manifest's sha256 (a different encoder's states mean nothing to the U-Net)."""
    recorded = manifest.get("text_encoder") or {}
    path = cfg.text_encoder or recorded.get("checkpoint", "")
    want = recorded.get("checkpoint_sha256", "")
    if not path:
        if want:
            raise ValueError(
                f"text_encoder: the dataset {cfg.tokens} was encoded with a checkpoint "
                f"(sha256 {want[:12]}...) that its manifest does not locate; set text_encoder="
            )
        return ""  # random-weights encoder (tests): the manifest recorded none either
    # The weights file's sha256, also inside an open_clip release folder: what tokenize recorded
    # (`check_checkpoint`) and training checks (`ldm_text.load_frozen_encoder`); a folder's
    # whole-tree digest would never match it. s3://: fetched once per node.
    spec = ClipSpec(recorded.get("model", ""), recorded.get("model_config"), path, 1, 1,
                    storage=cfg.storage)  # fmt: skip
    got = fetch_weights(spec, "text_encoder").sha256
    if got != want:
        raise ValueError(
            f"text_encoder {path}: sha256 {got[:12]}... but the dataset {cfg.tokens} was encoded "
            f"with {recorded.get('checkpoint') or 'another checkpoint'} (sha256 {want[:12]}...)"
        )
    loc = fs.resolve(path, storage=cfg.storage)  # the actor reads a local copy (cached above)
    return fs.fetch_checkpoint(path, storage=cfg.storage, what="text_encoder").path if loc.is_s3 \
        else loc.path


class LdmGenerator:
    """The latent-diffusion recipe, loaded once; `gen(rows) -> Chunk` samples those rows."""

    units = "denoising steps"

    def __init__(self, cfg: SampleConfig, prompts: list[str], device: str, log=print):
        from data_pipeline import token_dataset as T
        from data_pipeline.text_tokens import load_text_tokenizer
        from data_pipeline.tokenize.stages import EmbedText, TextEncoderSpec
        from trainer.pretrained.image_tokenizers import load_image_tokenizer

        self.cfg, self.device = cfg, device
        s = cfg.sample
        self.units_per_candidate = s.steps
        if is_pipeline(cfg.model, cfg.storage):
            self._init_pipeline(prompts, log)
            return
        if not cfg.tokens or not cfg.image_tokenizer:
            raise ValueError(
                f"recipe=ldm: model {cfg.model} is a `t2i train` run, which needs tokens= (its "
                f"latent dataset) and image_tokenizer= (a pipeline folder needs neither)"
            )
        model, train_cfg, uncond = load_ldm(cfg.model, cfg.storage, device)
        self.dtype = DTYPES[resolve_precision(cfg.precision, torch.device(device).type == "cuda")]
        self.model, self.train_cfg = model.to(self.dtype), train_cfg
        base = fs.resolve(cfg.tokens, storage=cfg.storage)
        manifest = T.read_latent_manifest(base)
        T.check_latent_compatible(
            manifest,
            latent_shape=model.cfg.latent_shape,
            text_width=model.cfg.cross_attention_dim,
            source=cfg.tokens,
        )
        self.image_tok = load_image_tokenizer(cfg.image_tokenizer, storage=cfg.storage,
                                              device=device)  # fmt: skip
        if self.image_tok.discrete:
            raise ValueError(
                f"image_tokenizer {cfg.image_tokenizer}: a {self.image_tok.kind} cannot decode "
                f"latents; recipe=ldm needs the dataset's KL autoencoder"
            )
        check_same_tokenizer(cfg, self.image_tok.fingerprint)
        text_tok = load_text_tokenizer(cfg.tokens, cfg.storage)
        for line in text_tok.truncation_warnings(prompts):
            log(f"warning: prompt {line}")
        ids = text_tok.encode(prompts)
        enc = manifest["text_encoder"]
        spec = TextEncoderSpec(enc["model"], enc.get("model_config"),
                               text_encoder_checkpoint(cfg, manifest), 64, torch.get_num_threads(),
                               pretrained=enc.get("pretrained", ""))  # fmt: skip
        length, width = manifest["text_embedding_shape"]
        states = EmbedText(spec).encode(ids).astype(np.float32).reshape(-1, length, width)
        self.text = torch.from_numpy(states).to(device)  # (P, L, D), fp16-rounded as in training
        self.mask = torch.from_numpy(ids != text_tok.pad_id).to(device)  # (P, L)
        if not train_cfg.ldm.text_mask:
            self.mask = None  # trained with SD's conditioning: no mask
        self.uncond = {k: torch.from_numpy(v).to(device) for k, v in uncond.items()}
        self.sched_config = train_cfg.ldm.schedule.scheduler_config(train_cfg.ldm.prediction_type)
        self.latent_shape = tuple(model.cfg.latent_shape)

    def _init_pipeline(self, prompts: list[str], log) -> None:
        """A diffusers Stable Diffusion pipeline folder (see the module docstring)."""
        from data_pipeline import token_dataset as T
        from trainer.init_weights import load_into
        from trainer.models.unet import Unet, shape_of
        from trainer.pretrained.diffusers_sd import (
            SCHEDULER,
            load_text_encoder,
            load_vae,
            local_copy,
            part_dir,
            released_unet,
        )

        cfg, device = self.cfg, self.device
        root = local_copy(cfg.model, cfg.storage, what="model").path
        released = released_unet(root, what="model")
        shape = shape_of(released.config)
        model = Unet(shape, released.unet_config)
        load_into(model, released.weights, prefix="unet.")
        self.dtype = DTYPES[resolve_precision(cfg.precision, torch.device(device).type == "cuda")]
        self.model = model.to(device).eval().to(self.dtype)
        enc = load_text_encoder(root, device)
        for text in prompts:
            n = len(enc.tokenizer(text)["input_ids"])
            if n > enc.text_len:
                log(f"warning: prompt {text!r} is {n} tokens, the encoder reads {enc.text_len}")
        ids, mask = enc.tokenize(prompts + [""])
        states = enc.encode(torch.from_numpy(ids), torch.from_numpy(mask)).float()
        if states.shape[-1] != shape.cross_attention_dim:
            raise ValueError(
                f"{released.config_path}: cross_attention_dim={shape.cross_attention_dim} but "
                f"the text encoder of {cfg.model} is {states.shape[-1]} wide"
            )
        self.text, self.mask = states[:-1].to(device), None  # SD: no text mask
        self.uncond = {T.TEXT_EMBEDDING: states[-1].to(device), T.TEXT_MASK: None}
        self.image_tok = load_vae(root, device)
        sched_path = os.path.join(part_dir(root, SCHEDULER), "scheduler_config.json")
        with open(sched_path) as f:
            sched = json.load(f)
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                "prediction_type", "clip_sample", "steps_offset", "timestep_spacing")  # fmt: skip
        self.sched_config = {k: sched[k] for k in keys if k in sched}
        self.latent_shape = tuple(shape.latent_shape)
        if self.image_tok.latent_channels != shape.in_channels:
            raise ValueError(
                f"{released.config_path}: in_channels={shape.in_channels} but the VAE of "
                f"{cfg.model} has {self.image_tok.latent_channels} latent channels"
            )

    def __call__(self, rows: list[tuple[int, int]]) -> Chunk:
        from data_pipeline import token_dataset as T

        s = self.cfg.sample
        seeds = np.array([candidate_seed(s.seed, p, c) for p, c in rows], np.int64)
        p_idx = torch.tensor([p for p, _ in rows], device=self.device)
        z = sample_latents(
            self.model,
            build_scheduler(s.scheduler, self.sched_config),
            self.text[p_idx],
            None if self.mask is None else self.mask[p_idx],
            self.uncond[T.TEXT_EMBEDDING],
            self.uncond[T.TEXT_MASK],
            latent_shape=self.latent_shape,
            steps=s.steps,
            guidance=s.guidance,
            generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds],
            eta=s.eta,
            dtype=self.dtype,
        )
        with torch.no_grad():
            pixels = self.image_tok.decode(z.float())  # (b, 3, H, W) in [0, 1]
        return Chunk(rows, to_uint8(pixels), seeds)


def generate_ldm(cfg: SampleConfig, prompts: list[str], device: str, log=print) -> Candidates:
    """Every candidate of every prompt with the latent-diffusion recipe, in this process."""
    return generate_all(LdmGenerator(cfg, prompts, device, log), cfg, prompts, log)
