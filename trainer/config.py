"""Typed job configuration: nested dataclasses, loaded from YAML, overridden by `key.sub=value`.

One module serves every `t2i` command. A job's schema is a dataclass tree; `load_config` builds it
from a YAML file (values only, no import strings) plus command-line overrides, and every problem —
an unknown key, a value of the wrong type, a required value left unset — raises `ConfigError`
naming the dotted key and where the value came from (the file or the command line).

Across a Ray boundary pass `dataclasses.asdict(cfg)` and rebuild with `from_dict(Schema, d)` on the
first line of the worker function; workers never read module globals.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from trainer.diffusion import NoiseSchedule
from trainer.models.dalle import DalleConfig, dalle_preset
from trainer.models.dvae import DvaeConfig
from trainer.models.klae import KlaeConfig
from trainer.models.unet import UnetConfig, unet_preset
from trainer.models.vqgan import VqganConfig

T = TypeVar("T")

# Sentinel for values a job cannot default (an output path, say). `validate_required` reports them.
REQUIRED: Any = "???"


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the source."""


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------


@dataclass
class StorageConfig:
    """Where `s3://` paths live. Credentials are never configured here: they come from the
    environment / boto3 credential chain (AWS_ACCESS_KEY_ID, AWS_PROFILE, instance roles)."""

    endpoint_url: str | None = None  # S3-compatible endpoint; default: $AWS_ENDPOINT_URL or AWS
    region: str | None = None  # default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1
    # S3 client (same defaults as data_pipeline.fs.S3Options): retries back off exponentially with
    # jitter (AWS "standard" strategy) on 503 SlowDown, 5xx, reset connections and timeouts.
    max_attempts: int = 10  # attempts per request, the first included (1: no retry)
    connect_timeout_s: float = 10.0  # TCP/TLS connect timeout
    request_timeout_s: float = 60.0  # a request whose transfer stalls this long is retried
    part_size_mb: int = 64  # multipart part size for large uploads (grows past 10,000 parts)


@dataclass
class RayConfig:
    """How a command reaches Ray: in-process local instance by default."""

    address: str | None = None  # None: $RAY_ADDRESS if set, else a local instance
    num_cpus: int | None = None  # local instance only; None: all cores
    dashboard: bool = True  # local instance only; bound to 127.0.0.1


# --------------------------------------------------------------------------------------------
# Job schemas
# --------------------------------------------------------------------------------------------


@dataclass
class DigitsConfig:
    """`t2i data digits`: scikit-learn's bundled handwritten digits as WebDataset shards."""

    out: str = REQUIRED  # output directory or s3://bucket/prefix
    image_size: int = 32  # 8x8 digits are upscaled (bilinear) to image_size x image_size
    val_fraction: float = 0.1  # deterministic held-out split
    samples_per_shard: int = 256
    mismatch_fraction: float = 0.0  # fraction of captions swapped to a wrong digit (recorded)
    seed: int = 0
    photos: int = 64  # real photo crops (scikit-image samples) for tokenizer checks; 0: none
    photo_size: int = 64  # side of each photo crop
    storage: StorageConfig = field(default_factory=StorageConfig)


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


@dataclass
class PreprocessClipSection:
    """CLIP scoring: cosine(image, text) from an open_clip model, run on a Ray actor pool."""

    enabled: bool = True  # False: no score filter and no near-duplicate detection
    model: str = "ViT-B-32"  # open_clip model name (built-in, or the stem of `model_config`)
    model_config: str = ""  # optional open_clip model-config JSON file for a custom architecture
    checkpoint: str = ""  # local open_clip checkpoint (.pt/.bin/.safetensors); "": random init
    threshold: float = 0.28  # keep cosine >= threshold (LAION-400M's value for ViT-B/32)
    batch_size: int = 64  # images per forward pass; batches are padded to it (batch-invariant)
    concurrency: int = 1  # actors in the pool
    num_gpus: float = 1.0  # per actor, used only when the cluster has GPUs
    num_cpus: float = 1.0  # per actor; also its torch thread count (at least 1)


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


# --------------------------------------------------------------------------------------------
# Loading machinery
# --------------------------------------------------------------------------------------------


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    require: bool = True,
) -> T:
    """Build `schema` from an optional YAML file, then apply dotted `key=value` overrides.

    Raises ConfigError naming the key and the file (or "command line") for unknown keys, wrong
    types, malformed overrides, and (with `require`) required values left unset.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    cfg = from_dict(schema, data, source=source)
    cfg = apply_overrides(cfg, overrides)
    if require:
        validate_required(cfg, source=source)
    return cfg


# Sections that accept `preset: NAME`: the named values first, the section's own keys on top.
PRESETS: dict[type, Any] = {DalleConfig: dalle_preset, UnetConfig: unet_preset}


def _from_preset(schema: type, name: Any, source: str, key: str) -> Any:
    try:
        return PRESETS[schema](name)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: '{key}': {e}") from None


def from_dict(
    schema: type[T], data: dict[str, Any], *, source: str = "dict", prefix: str = ""
) -> T:
    """Rebuild a dataclass tree from plain data (YAML or `asdict` output), checking every key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: '{prefix or '<root>'}' must be a mapping, got {type(data).__name__}"
        )
    if schema in PRESETS and "preset" in data:
        data = dict(data)
        base = _from_preset(schema, data.pop("preset"), source, _join(prefix, "preset"))
        data = {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, **data}
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        key = _join(prefix, str(unknown[0]))
        raise ConfigError(
            f"{source}: unknown key '{key}' (valid keys here: {', '.join(sorted(names))})"
        )
    kwargs = {
        name: _coerce(hints[name], value, source, _join(prefix, name))
        for name, value in data.items()
    }
    return schema(**kwargs)


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Apply `a.b.c=value` strings; values parse as YAML scalars/lists ("3", "true", "[1,2]").

    `section.preset=NAME` overrides apply first, so `dalle.preset=1b3 dalle.depth=12` means
    "the 1b3 preset with 12 layers" whatever the order on the command line.
    """
    overrides = sorted(overrides, key=lambda o: not o.partition("=")[0].strip().endswith("preset"))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"command line: override '{item}' must look like key.sub=value")
        cfg = _set_path(cfg, key.split("."), raw, key)
    return cfg


def validate_required(cfg: Any, *, source: str = "config", prefix: str = "") -> None:
    """Raise ConfigError for the first field still holding REQUIRED."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = _join(prefix, f.name)
        if dataclasses.is_dataclass(value):
            validate_required(value, source=source, prefix=key)
        elif isinstance(value, str) and value == REQUIRED:
            raise ConfigError(
                f"{source}: missing required value '{key}' (set it in the file or pass {key}=...)"
            )


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, for run directories and logs (holds no credentials)."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _set_path(node: Any, parts: list[str], raw: str, key: str) -> Any:
    """Return a copy of `node` with the field at `parts` set from the override string `raw`."""
    name = parts[0]
    if name == "preset" and len(parts) == 1 and type(node) in PRESETS:
        return _from_preset(type(node), raw.strip(), "command line", key)
    fields = {f.name: f for f in dataclasses.fields(node) if f.init}
    if name not in fields:
        done = key[: len(key) - len(".".join(parts))].rstrip(".")
        raise ConfigError(
            f"command line: unknown key '{key}' ('{name}' is not one of "
            f"{', '.join(sorted(fields))}{' under ' + repr(done) if done else ''})"
        )
    hint = typing.get_type_hints(type(node))[name]
    current = getattr(node, name)
    if len(parts) > 1:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"command line: '{key}': '{name}' has no sub-keys")
        value = _set_path(current, parts[1:], raw, key)
    else:
        value = _coerce(hint, _parse_override(hint, raw), "command line", key)
    return dataclasses.replace(node, **{name: value})


def _parse_override(hint: Any, raw: str) -> Any:
    # A str field keeps the text verbatim ("001" stays "001"); other types parse as YAML.
    if hint is str:
        return raw
    try:
        return yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        return raw


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against the type `hint`; convert only losslessly (int -> float)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{source}: '{key}' expects {_type_name(hint)}, got {value!r}") from (
            errors[0] if errors else None
        )

    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}"
            )
        return value

    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(item, v, source, f"{key}[{i}]") for i, v in enumerate(value)]

    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' expects a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, source, f"{key}.{k}") for k, v in value.items()}

    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if value is None:
            raise ConfigError(f"{source}: '{key}' expects a mapping, got null")
        return from_dict(hint, value, source=source, prefix=key)

    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # PyYAML reads "3e-4" (no dot) as a string; users mean a float
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{source}: '{key}' has an unsupported type {hint!r} in the schema")
    raise ConfigError(
        f"{source}: '{key}' expects {_type_name(hint)}, got {type(value).__name__} {value!r}"
    )
