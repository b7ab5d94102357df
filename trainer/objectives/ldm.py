"""objective=ldm: text-conditioned latent diffusion on a latent dataset (`t2i tokenize` recipe=ldm).

    z_0, text states, mask   <- the dataset (latents already x the KL-AE's scaling factor)
    caption dropout          :  with p = ldm.caption_dropout the row trains on the empty caption
    t ~ U{0..T-1}, ε ~ N(0,I):  z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε    (diffusers' DDPM schedule)
    loss                     =  mean_b w_b ‖target_b − U-Net(z_t, t, text)‖² / (C h w)
                                target ε or v; w = min-SNR-γ weights (1 when off)

Training never runs the autoencoder (the dataset holds its latents; the KL-AE is loaded only to
decode the logged sample grids), nor a text encoder when the dataset stores text states. A dataset
tokenized with `text: tokens` stores ids only: each worker then loads the dataset's text encoder,
frozen, and encodes the ids in the step (`ldm_text.py`; chosen once from the manifest). All noise is drawn on the CPU from torch's global
stream, which the loop seeds per rank and restores on resume: an interrupted run draws exactly
what the uninterrupted one would have, on any device.

The EMA of the weights (`trainer/ema.py`) is a loop callback: each rank averages its own shard;
`model.safetensors` and the diffusers export hold the EMA weights.

Fine-tuning released weights (`ldm.init_from`: a Stable Diffusion pipeline folder or its `unet/`):
the U-Net is built from its config.json and its weights load strictly as the engine builds it
(ZeRO-3: per module, gathered on rank 0; `trainer/init_weights.py`); the dataset's latent channels
and text width must equal the U-Net's. `ldm.text_mask: false` conditions as SD does (no mask over
the tokenizer's padding). The export is then a complete pipeline folder (`write_export`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from data_pipeline import fs
from data_pipeline import token_dataset as T
from data_pipeline.config import ConfigError
from trainer.config import TrainConfig
from trainer.diffusion import (
    compute_caption_drop,
    compute_min_snr_weights,
    compute_noisy,
    compute_target,
)
from trainer.ema import ShardedEma
from trainer.models.unet import Unet, add_lora, count_forward_flops, diffusers_config, shape_of
from trainer.objectives.ldm_buckets import compute_bucket_steps, regroup_buckets
from trainer.objectives.ldm_text import build_conditioning
from trainer.pretrained.diffusers_sd import released_unet
from trainer.recon import image_grid
from trainer.safe_files import save_safetensors
from trainer.sampling.ldm import build_scheduler, sample_latents

GRID_PROMPTS = 8  # captions of the first micro-batch sampled into the logged grid
SYNTHETIC_TEXT_LEN = 8  # text states per row of data.source=synthetic
EXPORT_INFO = "t2i_ldm.json"  # what sampling needs beside the diffusers folders
LORA = ".lora_"  # in the state-dict names of peft's adapters


class LdmObjective:
    name = "ldm"

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.u, self.l = cfg, cfg.unet, cfg.ldm
        self.init = None  # ldm.init_from: the released U-Net (config, weights file, folder)
        if cfg.ldm.init_from:  # on the driver too: a broken folder fails before Ray Train
            self.init = released_unet(cfg.ldm.init_from, cfg.storage)
            self.u = shape_of(self.init.config, cfg.unet)
        else:
            cfg.unet.check()  # on the driver too (it builds the objective): fail before Ray Train
        if not 0.0 <= cfg.ldm.random_flip <= 1.0:
            raise ValueError(f"ldm.random_flip must be in [0, 1], got {cfg.ldm.random_flip}")
        if cfg.ldm.random_flip and cfg.data.source != "tokens":
            raise ConfigError(
                f"ldm.random_flip={cfg.ldm.random_flip} needs a latent dataset with mirrored "
                f"latents (data.source=tokens, tokenized with flip=true)"
            )
        if cfg.ldm.lora_rank < 0:
            raise ValueError(f"ldm.lora_rank must be >= 0, got {cfg.ldm.lora_rank}")
        if cfg.ldm.lora_rank and cfg.engine.zero_stage == 3:
            raise ValueError(
                "ldm.lora_rank with engine.zero_stage=3 is not supported (the adapters are built "
                "after the base weights load); use ZeRO-2: only the adapters carry optimizer state"
            )
        self.ema = ShardedEma(cfg.ldm.ema_decay)
        self.callbacks = (self.ema,)
        self.alphas_cumprod = cfg.ldm.schedule.alphas_cumprod()  # (T,) float32
        self._manifest: dict | None = None
        self._uncond: dict[str, torch.Tensor] | None = None
        self._conditioning = None  # StoredStates | FrozenTextEncoder, built on first use
        self._autoencoder = None
        self._fwd_flops = 0.0

    # -- data ---------------------------------------------------------------------------------
    def _synthetic(self) -> T.SyntheticLatents:
        return T.SyntheticLatents(
            latent_shape=self.u.latent_shape,
            text_shape=(SYNTHETIC_TEXT_LEN, self.u.cross_attention_dim),
            seed=self.cfg.seed,
        )

    def manifest(self) -> dict:
        """The latent dataset's manifest, checked against the U-Net config (read once)."""
        if self._manifest is None:
            d = self.cfg.data
            if not d.path:
                raise ValueError("objective=ldm: data.path must name a latent dataset")
            base = fs.resolve(d.path, storage=self.cfg.storage)
            manifest = T.read_latent_manifest(base)
            try:
                T.check_latent_compatible(
                    manifest,
                    latent_shape=self.u.latent_shape,
                    text_width=self.u.cross_attention_dim,
                    scaling_factor=self.l.scaling_factor,
                    source=d.path,
                )
            except ValueError as e:
                if self.init is None:
                    raise
                raise ValueError(
                    f"{e} (the U-Net of ldm.init_from: {self.init.config_path})"
                ) from None
            if self.l.random_flip and not manifest.get("flip"):
                raise ConfigError(
                    f"ldm.random_flip={self.l.random_flip}: the latent dataset {d.path} holds no "
                    f"mirrored latents; tokenize it with flip=true (or set ldm.random_flip=0)"
                )
            self._check_buckets(manifest, d.path)
            self._manifest = manifest
        return self._manifest

    def dataset(self):
        d = self.cfg.data
        if d.source == "synthetic":
            import ray.data

            rows = ray.data.range(d.synthetic_samples, override_num_blocks=1)
            return rows.map_batches(self._synthetic(), batch_format="numpy")
        if d.source != "tokens":
            raise ValueError("objective=ldm reads a latent dataset: data.source=tokens|synthetic")
        self.manifest()
        flips = self.l.random_flip > 0  # the mirrored latents are read only when used
        ds, _ = T.read_latent_dataset(d.path, storage=self.cfg.storage, flips=flips)
        return ds

    def _check_buckets(self, manifest: dict, source: str) -> None:
        """A bucketed dataset: every bucket's latent grid must pass the U-Net's downsampling."""
        factor = 2 ** (len(self.u.block_out_channels) - 1)
        for s in (manifest.get("buckets") or {}).get("shapes", []):
            _, h, w = s["latent_shape"]
            if s.get("rows") and (h % factor or w % factor):
                raise ValueError(
                    f"{source}: bucket {s['size']} has a {h}x{w} latent, not divisible by the "
                    f"U-Net's downsampling {factor}: tokenize with a bucket_step that gives "
                    f"latent sides multiple of {factor}"
                )

    def batch_regrouper(self, world: int):
        """Loop hook: None, or (bucketed dataset) a function of a rank's mixed batch stream to
        one-grid batches, the same count on every rank (`ldm_buckets.py`)."""
        if self.cfg.data.source != "tokens" or not self.manifest().get("buckets"):
            return None
        m, b = self.manifest(), self.cfg.data.batch_size
        filled = sum(1 for s in m["buckets"]["shapes"] if s.get("rows"))
        steps = compute_bucket_steps(int(m["rows"]), world, b, filled)
        if steps < 1:
            raise ValueError(
                f"{self.cfg.data.path}: {m['rows']} rows in {filled} buckets give no full "
                f"one-bucket batch of data.batch_size={b} per rank on {world} workers (each rank "
                f"needs at least {filled} x ({b} - 1) + {b} rows)"
            )
        channels = int(m["latent_shape"][0])
        return lambda batches: regroup_buckets(batches, b, steps, channels)

    def empty_caption(self, device) -> dict[str, torch.Tensor]:
        """The unconditional text states (L, D) float32 and mask (L,) bool, on `device`."""
        if self._uncond is None:
            if self.cfg.data.source == "synthetic":
                arrays = self._synthetic().empty_caption()
            else:
                base = fs.resolve(self.cfg.data.path, storage=self.cfg.storage)
                arrays = T.read_empty_caption(base, self.manifest())
            self._uncond = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
        return {k: v.to(device) for k, v in self._uncond.items()}

    def conditioning(self, device, dtype: torch.dtype):
        """The batch -> (text states, mask) module the dataset asks for, built once on this
        worker's device: stored states, or (`text: tokens`) the frozen text encoder in the
        engine's precision (`trainer/objectives/ldm_text.py`)."""
        if self._conditioning is None:
            synthetic = self.cfg.data.source == "synthetic"
            self._conditioning = build_conditioning(
                None if synthetic else self.manifest(),
                self.empty_caption(device),
                storage=self.cfg.storage,
                device=torch.device(device),
                dtype=dtype,
            )
        return self._conditioning

    # -- model and loss -----------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        if self.init is None:
            model = Unet(self.u)  # (under ZeRO-3's zero.Init: partitioned as it is built)
        else:
            from trainer.init_weights import load_into

            model = Unet(self.u, self.init.unet_config)
            load_into(model, self.init.weights, prefix="unet.")  # ZeRO-3: per module, rank 0
        if self.l.lora_rank:  # frozen base, trainable adapters (the optimizer sees only them)
            add_lora(model, self.l.lora_rank, self.l.lora_alpha)
        return model

    def loss(self, engine, batch: dict[str, torch.Tensor]):
        z0 = batch[T.LATENT].float()  # (B, C, h, w), already scaled
        b, device = z0.shape[0], z0.device
        dtype = next(engine.module.parameters()).dtype
        # Noise on the CPU from the loop's seeded stream (device-independent, resume-exact).
        drop = compute_caption_drop(b, self.l.caption_dropout).to(device)
        t = torch.randint(0, len(self.alphas_cumprod), (b,)).to(device)
        eps = torch.randn(z0.shape).to(device)
        if self.l.random_flip:  # drawn only when on: default runs draw what they always did
            flip = (torch.rand(b) < self.l.random_flip).to(device)
            z0 = torch.where(flip[:, None, None, None], batch[T.LATENT_FLIP].float(), z0)
        # (B, L, D) float32, (B, L) bool; dropped rows: the empty caption
        text, mask = self.conditioning(device, dtype)(batch, drop)
        mask = mask if self.l.text_mask else None  # SD's conditioning: no mask
        z_t = compute_noisy(z0, eps, t, self.alphas_cumprod)
        target = compute_target(self.l.prediction_type, z0, eps, t, self.alphas_cumprod)
        pred = engine(z_t.to(dtype), t, text.to(dtype), mask).float()  # (B, C, h, w)
        per_sample = (pred - target).square().mean(dim=(1, 2, 3))  # (B,)
        weights = compute_min_snr_weights(
            self.l.prediction_type, t, self.alphas_cumprod, self.l.min_snr_gamma
        )
        loss = (weights * per_sample).mean()
        metrics = {"mse": per_sample.detach().mean(), "caption_drop": drop.float().mean()}
        return loss, metrics

    def tokens_in_batch(self, batch) -> int:
        """One "token" is one latent: throughput is latents/s."""
        return int(batch[T.LATENT].shape[0])

    def flops_per_token(self) -> float:
        """Forward + 2x for backward, per latent; counted once, outside any zero.Init context."""
        if not self._fwd_flops:
            text_len = SYNTHETIC_TEXT_LEN
            if self.cfg.data.source == "tokens":
                text_len = self.manifest()["text_embedding_shape"][0]
            self._fwd_flops = count_forward_flops(
                self.u, text_len, None if self.init is None else self.init.unet_config
            )
        return 3.0 * self._fwd_flops

    # -- logged sample grids ------------------------------------------------------------------
    def autoencoder(self):
        """The dataset's KL-AE (ldm.autoencoder, else the path the manifest records), checked by
        fingerprint; None for synthetic data or when no path is known."""
        if self._autoencoder is None and self.cfg.data.source == "tokens":
            recorded = self.manifest()["image_tokenizer"]
            path = self.l.autoencoder or recorded.get("path", "")
            if not path:
                return None
            from trainer.pretrained.image_tokenizers import load_image_tokenizer

            tok = load_image_tokenizer(path, storage=self.cfg.storage)
            if tok.fingerprint != recorded["fingerprint"]:
                raise ValueError(
                    f"ldm.autoencoder: {path} has fingerprint {tok.fingerprint}, but the latent "
                    f"dataset {self.cfg.data.path} was encoded by {recorded['fingerprint']}"
                )
            self._autoencoder = tok
        return self._autoencoder

    @torch.no_grad()
    def log_images(self, engine, batch) -> dict[str, np.ndarray]:
        """Log steps: DDIM samples (with guidance) for the batch's first captions, decoded by the
        dataset's KL-AE. Every rank runs the U-Net (a ZeRO-3 forward is a collective)."""
        tok = self.autoencoder()
        if tok is None:  # nothing to decode with (synthetic latents): no sampling either
            return {}
        n = min(GRID_PROMPTS, batch[T.LATENT].shape[0])
        device, dtype = batch[T.LATENT].device, next(engine.module.parameters()).dtype
        keep = torch.zeros(n, dtype=torch.bool, device=device)  # no caption dropped
        text, mask = self.conditioning(device, dtype)({k: v[:n] for k, v in batch.items()}, keep)
        uncond = self.empty_caption(device)
        z = sample_latents(
            engine.module,
            build_scheduler("ddim", self.l.schedule.scheduler_config(self.l.prediction_type)),
            text,
            mask if self.l.text_mask else None,
            uncond[T.TEXT_EMBEDDING],
            uncond[T.TEXT_MASK],
            latent_shape=tuple(batch[T.LATENT].shape[1:]),  # the batch's bucket (or square)
            steps=self.l.sample_steps,
            guidance=self.l.sample_guidance,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            dtype=next(engine.module.parameters()).dtype,
        )
        real = tok.decode(batch[T.LATENT][:n].float().cpu())
        return {"samples": image_grid([real, tok.decode(z.cpu())])}

    # -- export -------------------------------------------------------------------------------
    def export_state_dict(self, engine) -> dict[str, torch.Tensor] | None:
        """The EMA weights, gathered on rank 0 (a collective: every rank calls it); the raw
        weights too (kept for `write_export`'s `unet/` non-EMA file)."""
        from trainer.engine import export_module_state

        self._raw = export_module_state(engine)
        return self.ema.export()

    def write_export(self, local: str, weights: dict[str, torch.Tensor]) -> None:
        """Rank 0, beside model.safetensors: diffusers folders `unet/` (EMA weights) and
        `scheduler/`, `vae/` when the KL-AE is known, the empty-caption states, and
        `t2i_ldm.json` (text encoder path + fingerprint, latent scale and shapes). The raw
        weights sit beside the EMA ones in `unet/` as in Stable Diffusion's releases
        (`diffusion_pytorch_model.non_ema.safetensors`). With a pipeline folder to take the text
        encoder from (`ldm.init_from`, or the dataset's `pretrained:`), the export is a complete
        pipeline folder (`model_index.json`, `text_encoder/`, `tokenizer/`, `vae/`)."""
        unet_cfg = None if self.init is None else self.init.config
        raw = getattr(self, "_raw", None)
        if self.l.lora_rank:  # unet/: the (frozen) base; the adapters in diffusers' LoRA file
            self._write_lora(local, weights, unet_cfg)
            weights = {k.replace(".base_layer", ""): v for k, v in weights.items() if LORA not in k}
            raw = None  # the raw base is the EMA base: frozen
        write_diffusers_unet(os.path.join(local, "unet"), self.u, weights, unet_cfg)
        if raw is not None:
            write_diffusers_unet(os.path.join(local, "unet"), self.u, raw, unet_cfg,
                                 name=NON_EMA_WEIGHTS)  # fmt: skip
        sched = build_scheduler("ddim", self.l.schedule.scheduler_config(self.l.prediction_type))
        sched.save_config(os.path.join(local, "scheduler"))
        info = {"latent_shape": self.u.latent_shape, "prediction_type": self.l.prediction_type}
        if self.cfg.data.source == "tokens":
            m = self.manifest()
            tok = self.autoencoder()
            if tok is not None:
                write_diffusers_vae(os.path.join(local, "vae"), tok)
            info.update(
                scaling_factor=m["scaling_factor"],
                text_embedding_shape=m["text_embedding_shape"],
                text_encoder=m["text_encoder"],
                text_tokenizer=m.get("text_tokenizer"),
                image_tokenizer=m["image_tokenizer"],
                dataset=self.cfg.data.path,
            )
        uncond = self.empty_caption("cpu")
        with open(os.path.join(local, T.EMPTY_CAPTION_FILE), "wb") as f:
            f.write(T.empty_caption_bytes(uncond[T.TEXT_EMBEDDING].numpy(),
                                          uncond[T.TEXT_MASK].numpy()))  # fmt: skip
        with open(os.path.join(local, EXPORT_INFO), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        self._write_pipeline(local)

    def _write_lora(self, local: str, weights: dict, unet_cfg: dict | None) -> None:
        """`pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights` reads it) from the
        exported adapters, converted as diffusers' LoRA training script converts them."""
        from diffusers import StableDiffusionPipeline

        from trainer.models.unet import lora_state_for_diffusers

        model = Unet(self.u, None if unet_cfg is None else {
            k: v for k, v in unet_cfg.items() if not k.startswith("_")})  # fmt: skip
        add_lora(model, self.l.lora_rank, self.l.lora_alpha)
        model.load_state_dict(weights, strict=True)
        StableDiffusionPipeline.save_lora_weights(
            local, unet_lora_layers=lora_state_for_diffusers(model), safe_serialization=True
        )

    def _pipeline_source(self) -> str:
        """A local pipeline folder holding the text encoder the model was trained with."""
        if self.init is not None and self.init.is_pipeline:
            return self.init.root
        if self.cfg.data.source == "tokens" and self.manifest().get("pretrained"):
            from trainer.pretrained.diffusers_sd import local_copy

            return local_copy(self.manifest()["pretrained"], self.cfg.storage).path
        return ""

    def _write_pipeline(self, local: str) -> None:
        """`text_encoder/`, `tokenizer/` (and `vae/` if none was written) copied from the source
        pipeline, then `model_index.json` (last: the folder is then a pipeline)."""
        import shutil

        import diffusers

        from trainer.pretrained.diffusers_sd import MODEL_INDEX, TEXT_ENCODER, TOKENIZER, VAE

        src = self._pipeline_source()
        if not src:
            return
        for part in (TEXT_ENCODER, TOKENIZER, VAE):
            if not os.path.isdir(os.path.join(local, part)):
                shutil.copytree(os.path.join(src, part), os.path.join(local, part))
        index = {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        with open(os.path.join(local, MODEL_INDEX), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


NON_EMA_WEIGHTS = "diffusion_pytorch_model.non_ema.safetensors"  # SD releases' raw weights


def write_diffusers_unet(
    folder: str,
    cfg,
    weights: dict[str, torch.Tensor],
    unet_config: dict | None = None,
    *,
    name: str = "diffusion_pytorch_model.safetensors",
) -> None:
    """`UNet2DConditionModel.from_pretrained(folder)` layout: config.json + safetensors
    (`unet_config`: a released U-Net's config.json, else the one of `cfg`)."""
    import diffusers

    os.makedirs(folder, exist_ok=True)
    config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers.__version__}
    shape = diffusers_config(cfg) if unet_config is None else unet_config
    config.update({k: list(v) if isinstance(v, tuple) else v
                   for k, v in shape.items() if not k.startswith("_")})  # fmt: skip
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    prefix = "unet."
    state = {k[len(prefix) :]: v.contiguous() for k, v in weights.items() if k.startswith(prefix)}
    save_safetensors(state, os.path.join(folder, name))


def write_diffusers_vae(folder: str, tok) -> None:
    """`AutoencoderKL.from_pretrained(folder)` layout for our KL-AE tokenizer (its scaling
    factor in config.json, as SD's `vae/` carries it)."""
    import diffusers

    from trainer.models.klae import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS
    from trainer.models.klae import diffusers_config as klae_config

    os.makedirs(folder, exist_ok=True)
    config = {"_class_name": "AutoencoderKL", "_diffusers_version": diffusers.__version__}
    config.update({k: list(v) if isinstance(v, tuple) else v
                   for k, v in klae_config(tok.cfg, tok.scaling_factor).items()})  # fmt: skip
    with open(os.path.join(folder, DIFFUSERS_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    state = {k: v.detach().float().contiguous() for k, v in tok.state_dict().items()}
    save_safetensors(state, os.path.join(folder, DIFFUSERS_WEIGHTS))
