"""`TrainConfig`: the typed config of `t2i train` (every objective), beside its job.

Loaded like every job's config by `data_pipeline.config.load_config` (YAML + dotted overrides,
errors naming the key and the file). Model shapes (`dalle:`, `dvae:`, `unet:`, ...) are the
models' own dataclasses, which model code and exported configs read; the sections here say how
they are trained: `dalle_train:`, `dvae_train:`, `vqgan_train:`, `klae_train:`, and `ldm:` for
the U-Net (training-only values never sit in a shape section).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal

from data_pipeline.clip_score import OpenClipSection
from data_pipeline.config import REQUIRED, RayConfig, StorageConfig
from trainer.diffusion import NoiseSchedule
from trainer.models.dalle import DalleConfig
from trainer.models.dvae import DvaeConfig
from trainer.models.klae import KlaeConfig
from trainer.models.unet import UnetConfig
from trainer.models.vqgan import VqganConfig


@dataclass
class ScalingSection:
    """Ray Train workers: one data-parallel rank each."""

    num_workers: int = 2
    use_gpu: bool = False  # one GPU per worker when True
    cpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # CPUs reserved (a placement group beside the workers') for the Ray Data tasks feeding the
    # workers, at least what the objective's data path holds at once; 0: no reservation.
    # None: scaled with the workers (trainer.launch.default_data_cpus): per worker 2 for image
    # objectives on GPUs (they decode images on the CPU), 0.5 for token/latent ones; a quarter
    # of that for CPU workers; at least 1.
    data_cpus: float | None = None
    # When the alive nodes hold less than the workers + data_cpus, the driver says so (naming
    # the missing resources) after this many seconds, and again every as many while it lasts.
    capacity_wait_s: float = 60.0
    # Then: keep waiting for nodes (autoscaling clusters, replacements) or stop the run.
    on_capacity_shortage: Literal["wait", "fail"] = "wait"

    def __post_init__(self):
        if self.data_cpus is not None and 0 < self.data_cpus < 1:
            raise ValueError(
                f"scaling.data_cpus must be 0 (no reservation) or >= 1 (every Ray Data task "
                f"takes 1 CPU), got {self.data_cpus:g}"
            )


@dataclass
class OptimizerSection:
    """AdamW with linear warmup then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.01  # not applied to biases, norms and embeddings
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables


@dataclass
class EngineSection:
    """How DeepSpeed runs the model: the one place parallelism and precision are chosen."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    # auto: bf16 where the hardware has it (GPU or AVX512-BF16/AMX CPU), else fp16 (GPU) / fp32
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    # bf16 only. false: DeepSpeed's bf16 mode (bf16 weights, fp32 master copies in the optimizer).
    # true: fp32 weights (they are the master copy) and the forward + loss under torch.autocast,
    # the mixed-precision loop a plain PyTorch user writes; fastest at ZeRO-0 on CPUs (see
    # docs/benchmarks.md), while ZeRO-1/2/3 gather and reduce half the bytes in DeepSpeed's mode.
    autocast: bool = False
    grad_accum_steps: int = 1
    activation_checkpointing: bool = False  # recompute each transformer block in backward
    zero_init: bool = True  # stage 3: build the model partitioned (no rank holds it whole)
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"  # ZeRO-Offload / ZeRO-Infinity
    nvme_path: str = "/tmp/t2i-nvme"  # local disk for offload_optimizer=nvme
    sub_group_size: int = 50_000_000  # stage 3 optimizer-step granularity (bounds peak memory)
    max_bad_steps: int = 5  # consecutive non-finite steps before the job stops


@dataclass
class DataSection:
    """Where training batches come from: a token dataset (from `t2i tokenize`) or synthetic."""

    source: Literal["tokens", "synthetic", "shards"] = "tokens"
    path: str = ""  # token dataset (source=tokens) or WebDataset shards dir/glob (source=shards)
    batch_size: int = 8  # per worker, per micro-step
    synthetic_samples: int = 512  # rows per epoch (source=synthetic)
    shuffle_seed: int = 0  # per-epoch shuffle is seeded: every run sees the same order
    local_shuffle_buffer: int = 0  # rows; 0 keeps the dataset order
    # Materialize once in the object store (small datasets: no re-read per epoch).
    cache: bool = False


@dataclass
class CheckpointSection:
    """Checkpoints under `<storage_path>/<run name>/checkpoints/step_NNNNNNN/`."""

    storage_path: str = "runs/train"  # local dir or s3://bucket/prefix
    every_steps: int = 100  # 0: only at the end
    keep: int = 3  # complete checkpoints kept (older ones deleted); 0 keeps all
    export_weights: bool = True  # also write consolidated model.safetensors at the end
    at_end: bool = True  # checkpoint the last step (False: benchmarks that only measure steps)


@dataclass
class ClipModelSection(OpenClipSection):
    """objective=clip: an open_clip model (`model`, `model_config`: see `OpenClipSection`)
    trained from scratch with open_clip's contrastive loss."""

    model: str = "clip_digits_tiny"
    model_config: str = "jobs/configs/clip_digits_tiny.json"


@dataclass
class DalleTrainSection:
    """objective=dalle: how the transformer is trained (its shape is the `dalle:` section)."""

    # Caption noise (`trainer.models.dalle.corrupt_text`), training batches only:
    text_insert_p: float = 0.0  # chance a caption gets random tokens inserted at random places
    text_replace_p: float = 0.0  # chance each caption token is replaced by a random id
    text_loss_weight: float = 1 / 8  # weight of the text cross-entropy (DALL-E: 1/8)
    image_loss_weight: float = 7 / 8  # weight of the image cross-entropy (DALL-E: 7/8)

    def __post_init__(self):
        for name in ("text_insert_p", "text_replace_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"dalle_train.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("text_loss_weight", "image_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"dalle_train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class DvaeTrainSection:
    """objective=dvae: how the discrete VAE is trained (its shape is the `dvae:` section).

    Defaults are the paper's: tau 1 -> 1/16 over 150k steps, beta 0 -> 6.6 over 5k steps."""

    # Reconstruction term. "mse": squared error of unmap_pixels(sigmoid(mu)) in [0, 1], i.e. it
    # maximises PSNR directly and ignores the scale half of the decoder output; small models on
    # small data get sharp reconstructions from it within minutes. "logit_laplace": the paper's
    # negative log-likelihood (mu and ln b), for faithful large-scale training.
    recon_loss: Literal["mse", "logit_laplace"] = "mse"
    tau_start: float = 1.0  # Gumbel-softmax temperature at step 0
    tau_end: float = 1 / 16  # ... reached at `tau_steps` (cosine), then held
    tau_steps: int = 150_000
    # beta in the paper's units: weight of the KL(q || uniform) summed over the grid against the
    # reconstruction term summed over pixel values (the loss divides both by C*H*W).
    kl_weight: float = 6.6
    kl_warmup_steps: int = 5_000  # beta rises 0 -> kl_weight (cosine) over these steps

    def __post_init__(self):
        for name in ("tau_steps", "kl_warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"dvae_train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(
                f"dvae_train: need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}"
            )


@dataclass
class VqganTrainSection:
    """objective=vqgan: how the VQGAN is trained (its shape is the `vqgan:` section): codebook
    upkeep, taming's `VQLPIPSWithDiscriminator` loss weights and PatchGAN, initial weights."""

    # --- codebook ---
    beta: float = 0.25  # commitment weight: beta * ||z_e - sg[e]||^2
    dead_code_every: int = 0  # steps between dead-code restarts (0: never)
    dead_code_min_uses: int = 1  # a code picked fewer times than this since the last restart
    # --- loss weights (taming `VQLPIPSWithDiscriminator` params) ---
    codebook_weight: float = 1.0
    pixelloss_weight: float = 1.0  # L1 in [-1, 1]
    perceptual_weight: float = 1.0  # VGG16 feature loss; only with `perceptual_weights`
    perceptual_weights: str = ""  # local torchvision `vgg16` state dict; "": pixel loss only
    # --- discriminator (taming NLayerDiscriminator, BatchNorm, hinge or vanilla loss) ---
    disc_start: int = 10_000  # optimizer step at which the GAN terms switch on
    disc_weight: float = 0.8  # multiplies the adaptive weight
    disc_factor: float = 1.0
    disc_num_layers: int = 3
    disc_ndf: int = 64
    disc_in_channels: int = 3
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_lr: float = 0.0  # discriminator Adam lr; 0: optimizer.lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # taming's
    # Start from these weights (a model.safetensors, or a directory holding one: an exported run
    # or a `t2i convert --from taming-vqgan` output); `loss.discriminator.*` keys, when present,
    # initialise the discriminator too. Optimizers start fresh. A resumed run ignores it.
    init_from: str = ""

    def __post_init__(self):
        if self.dead_code_every < 0 or self.disc_start < 0:
            raise ValueError("vqgan_train: dead_code_every and disc_start must be >= 0")
        if len(self.disc_betas) != 2:
            raise ValueError(f"vqgan_train.disc_betas must hold 2 values, got {self.disc_betas}")


@dataclass
class KlaeTrainSection:
    """objective=klae: how the KL autoencoder is trained (its shape is the `klae:` section): its
    loss, and how its latent scaling factor is measured."""

    recon_loss: Literal["l1", "mse"] = "l1"  # pixel term, mean per pixel value in [-1, 1]
    # In SD's units (LDM's `kl_weight`, 1e-6 for SD): weight of the KL summed over an image's
    # latent elements against the pixel loss summed over its pixel values. The loss divides both
    # by the number of pixel values, so the logged loss is per pixel value.
    kl_weight: float = 1e-6
    scale_batches: int = 8  # micro-batches per rank whose latents set the scaling factor

    def __post_init__(self):
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(
                f"klae_train.recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}"
            )
        if self.kl_weight < 0 or self.scale_batches < 1:
            raise ValueError(
                f"klae_train: need kl_weight >= 0 and scale_batches >= 1, got "
                f"{self.kl_weight} and {self.scale_batches}"
            )


@dataclass
class LdmSection:
    """objective=ldm: how the U-Net is trained (its shape is the `unet:` section)."""

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # the U-Net's target
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)  # diffusers DDPM schedule
    caption_dropout: float = 0.1  # p of training on the empty caption (classifier-free guidance)
    min_snr_gamma: float = 0.0  # min-SNR-γ loss weighting (5.0 in the paper); 0: off
    ema_decay: float = 0.9999  # EMA of the weights (export and sampling use it)
    # Latent scale the model is trained for; 0: the dataset manifest's (its KL-AE's). A set value
    # that differs from the manifest's is an error: the latents would be scaled differently.
    scaling_factor: float = 0.0
    autoencoder: str = ""  # the dataset's KL-AE (run dir or export), for logged sample grids
    sample_steps: int = 20  # DDIM steps of the logged sample grids
    sample_guidance: float = 3.0  # classifier-free guidance scale of the logged grids
    # Start from released weights: a diffusers pipeline folder or its `unet/` (local or s3://).
    # The U-Net's shape is then its config.json (the `unet:` section is not used), its weights
    # load strictly; an export copies the folder's text_encoder/, tokenizer/ and vae/ beside ours.
    init_from: str = ""
    # Give the U-Net the text mask. Stable Diffusion never does (it attends to the tokenizer's
    # padding too): false trains and samples with SD's own conditioning.
    text_mask: bool = True
    # LoRA (peft) on the attention projections (to_q, to_k, to_v, to_out.0, as diffusers' LoRA
    # examples): only the adapters train and carry optimizer state; 0: full fine-tuning. The
    # export adds `pytorch_lora_weights.safetensors` (diffusers' `load_lora_weights` reads it)
    # beside the base `unet/`. ZeRO-0/1/2 only.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # LoRA scale alpha / rank; 0: alpha = rank
    # Probability of training a row on its mirrored image: the dataset's `latent_flip` (the
    # autoencoder's latent of the flipped image; `t2i tokenize` flip=true), drawn per row from
    # the loop's seeded CPU stream (resume-exact). 0: off (no draw)
    random_flip: float = 0.0


@dataclass
class FaultSection:
    """Fault injection for recovery drills (trainer/faults.py): all off by default."""

    # Each kill or damage records itself here (a local dir every worker can write), so a
    # restarted attempt does not repeat it. Required when any of the next four is set.
    marker_dir: str = ""
    kill_at_steps: list[int] = field(default_factory=list)  # a worker SIGKILLs after each
    kill_in_save_at_step: int = 0  # rank 0 SIGKILLs itself halfway through this checkpoint
    # Once this step's checkpoint is complete, rank 0 flips a byte of (or deletes) its model
    # state file in storage, then SIGKILLs itself: a committed checkpoint damaged later.
    flip_checkpoint_at_step: int = 0
    delete_checkpoint_file_at_step: int = 0
    # Every rank waits right after this step (0: never) until `pause_until_file` exists: a drill
    # can then lose a node at a known point. The step's checkpoint, if any, is complete by then.
    pause_at_step: int = 0
    pause_until_file: str = ""
    nan_loss_at_steps: list[int] = field(default_factory=list)  # NaN loss (once per listing)
    # A local dir: each rank appends the sample ids of every micro-batch it consumes (JSON lines)
    consumption_log: str = ""


def _moved(old: str, new: str, section: type) -> dict[str, str]:
    """`old.KEY` -> `new.KEY` for every field KEY of `section` (each one came from `old`)."""
    return {f"{old}.{f.name}": f"{new}.{f.name}" for f in fields(section)}


@dataclass
class TrainConfig:
    """`t2i train`: one engine, the objective picks model and loss."""

    # Keys that moved (an old key is an error naming its new one; see data_pipeline.config):
    # training settings left the model-shape sections, so exports record shapes only (#13).
    RENAMED: ClassVar[dict[str, str]] = {
        **_moved("dalle", "dalle_train", DalleTrainSection),
        **_moved("dvae", "dvae_train", DvaeTrainSection),
        **_moved("vqgan", "vqgan_train", VqganTrainSection),
        **_moved("klae", "klae_train", KlaeTrainSection),
    }
    # Fault injection took lists and a marker directory (trainer/faults.py).
    REPLACED: ClassVar[dict[str, str]] = {
        "faults.kill_at_step": "faults.kill_at_steps",
        "faults.kill_marker": "faults.marker_dir",
    }

    name: str = REQUIRED  # run name: re-running the same name resumes it
    objective: Literal["dalle", "clip", "dvae", "vqgan", "klae", "ldm"] = "dalle"
    steps: int = 100  # optimizer steps in total
    seed: int = 0
    log_every: int = 10
    # per worker, for MFU; 0: the GPU's datasheet peak (trainer/metrics.py), else a matmul
    # probe on the worker's device in the training dtype
    peak_tflops: float = 0.0
    # Per objective, the model's shape (a `trainer/models/` dataclass, what an export records)
    # and, in the `_train` section beside it, how it is trained.
    dalle: DalleConfig = field(default_factory=DalleConfig)  # objective=dalle: the transformer
    dalle_train: DalleTrainSection = field(default_factory=DalleTrainSection)
    clip: ClipModelSection = field(default_factory=ClipModelSection)  # objective=clip
    dvae: DvaeConfig = field(default_factory=DvaeConfig)  # objective=dvae: DALL-E's discrete VAE
    dvae_train: DvaeTrainSection = field(default_factory=DvaeTrainSection)
    vqgan: VqganConfig = field(default_factory=VqganConfig)  # objective=vqgan
    vqgan_train: VqganTrainSection = field(default_factory=VqganTrainSection)
    klae: KlaeConfig = field(default_factory=KlaeConfig)  # objective=klae: latent-diffusion AE
    klae_train: KlaeTrainSection = field(default_factory=KlaeTrainSection)
    unet: UnetConfig = field(default_factory=UnetConfig)  # objective=ldm: the U-Net's shape
    ldm: LdmSection = field(default_factory=LdmSection)  # objective=ldm: how it is trained
    scaling: ScalingSection = field(default_factory=ScalingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    engine: EngineSection = field(default_factory=EngineSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    failure_max_retries: int = 2  # worker-group restarts from the last complete checkpoint
    faults: FaultSection = field(default_factory=FaultSection)
