"""`TrainConfig`: the typed config of `t2i train` (every objective), beside its job.

Loaded like every job's config by `data_pipeline.config.load_config` (YAML + dotted overrides,
errors naming the key and the file). Model shapes (`dalle:`, `unet:`, ...) are the models' own
dataclasses; the sections here say how they are trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
    data_cpus: float = 1.0  # CPUs the Ray Data tasks feeding the workers need beside them
    # When the alive nodes hold less than the workers + data_cpus, the driver says so (naming
    # the missing resources) after this many seconds, and again every as many while it lasts.
    capacity_wait_s: float = 60.0
    # Then: keep waiting for nodes (autoscaling clusters, replacements) or stop the run.
    on_capacity_shortage: Literal["wait", "fail"] = "wait"


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
class ClipModelSection:
    """objective=clip: an open_clip model trained with open_clip's contrastive loss."""

    model: str = "clip_digits_tiny"  # open_clip architecture: built-in name or model_config's stem
    model_config: str = (
        "jobs/configs/clip_digits_tiny.json"  # custom architecture JSON; "": built-in
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


@dataclass
class FaultSection:
    """Fault injection, for testing recovery (chaos drills): off by default."""

    kill_at_step: int = 0  # hard-kill one worker process right after this step; 0: never
    kill_marker: str = ""  # file that records the kill, so only the first attempt dies
    # Every rank waits right after this step (0: never) until `pause_until_file` exists: a drill
    # can then lose a node at a known point. The step's checkpoint, if any, is complete by then.
    pause_at_step: int = 0
    pause_until_file: str = ""
    nan_loss_at_steps: list[int] = field(
        default_factory=list
    )  # NaN loss at these steps (per listing)


@dataclass
class TrainConfig:
    """`t2i train`: one engine, the objective picks model and loss."""

    name: str = REQUIRED  # run name: re-running the same name resumes it
    objective: Literal["dalle", "clip", "dvae", "vqgan", "klae", "ldm"] = "dalle"
    steps: int = 100  # optimizer steps in total
    seed: int = 0
    log_every: int = 10
    peak_tflops: float = 0.0  # per worker, for MFU; 0: measure a bf16 matmul at start
    dalle: DalleConfig = field(default_factory=DalleConfig)  # objective=dalle: the transformer
    clip: ClipModelSection = field(default_factory=ClipModelSection)  # objective=clip
    dvae: DvaeConfig = field(default_factory=DvaeConfig)  # objective=dvae: DALL-E's discrete VAE
    vqgan: VqganConfig = field(default_factory=VqganConfig)  # objective=vqgan
    klae: KlaeConfig = field(default_factory=KlaeConfig)  # objective=klae: latent-diffusion AE
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
