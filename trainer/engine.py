"""The engine: the one place that turns a typed config into DeepSpeed-wrapped models.

Order of application (like torchtitan's `parallelize.py`): build the single-device model
(partitioned at construction under ZeRO-3), apply activation checkpointing to each block, then
`deepspeed.initialize` with a config generated here — no script writes its own DeepSpeed dict.

Parts. An objective trains one module (`build_model()`, the part named "model") or several, each
with its own optimizer: it declares `parts = ("model", "discriminator")` and `build_parts()`, and
may give a part its own optimizer settings with `optimizer_section(part)`. Each part becomes its
own DeepSpeed engine (its own ZeRO partitioning, optimizer, gradient clipping and checkpoint
state), and the loop updates the parts in order on every micro-batch, with `trains_only(part)`
freezing the others during that part's forward (as Lightning's `toggle_optimizer` does), so a
generator loss that runs the discriminator puts no gradient on it. Why engines per part rather
than one engine with two parameter groups: a single DeepSpeed optimizer steps all of its groups
together and clips them by one global norm, while a GAN needs two losses, two backward passes and
independently clipped, independently skippable updates; DeepSpeed engines are cheap to have
several of, and their save/load already covers model + optimizer state per engine.

Two rules for multi-part objectives, found with DeepSpeed 0.19: (1) any autograd pass that
reaches an engine's parameters, `torch.autograd.grad(loss, param)` included, fires that engine's
ZeRO gradient hooks and reduction epilogue, so an objective that needs such gradients (taming's
adaptive GAN weight) stops its pass before the parameters (`compute_conv_weight_grads`); (2) a
part run inside another part's loss is called as `engines[part].module`, not through its engine.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer import distributed as tdist
from trainer.config import OptimizerSection, TrainConfig

MODEL = "model"  # the part of a single-module objective (and the first part of a multi-part one)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def worker_device_env(use_gpu: bool) -> dict[str, str]:
    """The environment a training worker gives itself before DeepSpeed is imported: the device
    follows what Ray reserved for it (`scaling.use_gpu`), never what the host has
    (`torch.cuda.is_available()`) nor a `DS_ACCELERATOR` inherited from the driver's shell (the
    Makefile exports `cpu`). A CPU worker also hides the node's GPUs: Ray sets
    CUDA_VISIBLE_DEVICES only for workers that reserved GPUs, so one that reserved none would
    otherwise see, and could use, every GPU of its node."""
    if use_gpu:
        return {"DS_ACCELERATOR": "cuda"}
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def apply_worker_device(use_gpu: bool) -> torch.device:
    """Set `worker_device_env(use_gpu)` in this process (first thing in a training worker, before
    CUDA is initialised or DeepSpeed imported) and return the device the worker computes on.
    If DeepSpeed already picked another accelerator in this process, its choice is dropped so the
    next `get_accelerator()` reads the environment again."""
    env = worker_device_env(use_gpu)
    os.environ.update(env)
    if "deepspeed" in sys.modules:
        from deepspeed.accelerator import real_accelerator

        chosen = real_accelerator.ds_accelerator
        if chosen is not None and chosen._name != env["DS_ACCELERATOR"]:
            real_accelerator.ds_accelerator = None
    return worker_device(use_gpu)


def worker_device(use_gpu: bool) -> torch.device:
    """The device a training worker computes on: its GPU (the current CUDA device, which Ray
    Train sets to the one it reserved) when `scaling.use_gpu`, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")


def dist_backend(use_gpu: bool) -> str:
    """The process-group backend Ray Train creates (and DeepSpeed adopts): NCCL on GPU workers,
    gloo on CPU workers; from the reservation, like the device."""
    return "nccl" if use_gpu else "gloo"


def native_bf16(gpu: bool | None = None) -> bool:
    """Whether this machine computes bf16 in hardware: a GPU that supports it natively (Ampere
    or newer; torch counts emulated bf16 as supported unless `including_emulation=False`), or a
    CPU with AVX512-BF16 or AMX. Elsewhere bf16 is emulated: on an AVX2-only CPU we measured a
    bf16 matmul at 0.8 GFLOP/s against 66 for fp32 (2 threads).
    `gpu`: whether the computation runs on the GPU (a training worker: `scaling.use_gpu`);
    None: whenever this process sees one."""
    if torch.cuda.is_available() if gpu is None else gpu:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    cpu = torch.cpu
    return any(
        getattr(cpu, f, lambda: False)()
        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def resolve_precision(precision: str, gpu: bool | None = None) -> str:
    """`auto` -> bf16 where it is native, fp16 on a GPU without bf16, fp32 on any other CPU.
    `gpu` as in `native_bf16`."""
    if precision != "auto":
        return precision
    gpu = torch.cuda.is_available() if gpu is None else gpu
    if native_bf16(gpu):
        return "bf16"
    return "fp16" if gpu else "fp32"


def model_width(cfg: TrainConfig) -> int:
    """The hidden width h of the objective's model, read from its shape section: the DALL-E's
    residual width, the widest level of a U-Net / autoencoder, the dVAE's last encoder group.
    0 for CLIP (its width is the open_clip architecture's)."""
    o = cfg.objective
    if o == "dalle":
        return max(cfg.dalle.dim, cfg.dalle.heads * cfg.dalle.head_dim)
    if o == "ldm":
        return max(cfg.unet.block_out_channels)
    if o == "klae":
        return max(cfg.klae.block_out_channels)
    if o == "vqgan":
        return cfg.vqgan.ch * max(cfg.vqgan.ch_mult)
    if o == "dvae":
        return cfg.dvae.n_hid * 2 ** (cfg.dvae.group_count - 1)
    return 0


def zero_gpu_buckets(stage: int, width: int) -> dict:
    """ZeRO bucket sizes for GPU ranks, from the model's hidden width h (empty when h is unknown:
    DeepSpeed's defaults). The rule:

      reduce_bucket_size                  h^2    (DeepSpeed's "auto" value, as its Hugging Face
                                                 integration fills it in)
      stage3_prefetch_bucket_size         12 h^2 (one transformer layer: qkv + out 4h^2, MLP
                                                 8h^2): the next layer is gathered while this
                                                 one computes; less cannot hide its gather
      stage3_max_live_parameters          max(1e9, 3 layers): DeepSpeed's default, at least
      stage3_max_reuse_distance           the layer being computed, the prefetched one and one
                                                 more
      stage3_param_persistence_threshold  10 h   ("auto": biases and norms stay whole)
    """
    if not width:
        return {}
    h2 = width * width
    out: dict = {"reduce_bucket_size": h2}
    if stage == 3:
        layer = 12 * h2
        live = max(10**9, 3 * layer)
        out.update(
            stage3_prefetch_bucket_size=layer,
            stage3_max_live_parameters=live,
            stage3_max_reuse_distance=live,
            stage3_param_persistence_threshold=10 * width,
        )
    return out


def build_deepspeed_config(
    cfg: TrainConfig, world_size: int, optimizer: OptimizerSection | None = None
) -> dict:
    """DeepSpeed's JSON config from the typed config. LR scheduling is ours (`compute_lr`).
    `optimizer`: a part's own settings (its gradient clipping); default `cfg.optimizer`.

    GPU workers (`scaling.use_gpu`) and CPU workers get different ZeRO settings. GPUs: gradient
    reduction overlaps backward (`overlap_comm`), buckets are sized from the model's width
    (`zero_gpu_buckets`), offloaded optimizer state sits in pinned host memory (fast copies).
    CPUs: the values measured on the project's 2-core machines: no overlap (no copy engine to
    overlap with; its buffers cost host memory), ZeRO-3 gathers bounded by `sub_group_size` so
    host memory per rank shrinks with the world size, unpinned offload buffers."""
    e, o = cfg.engine, optimizer or cfg.optimizer
    gpu = cfg.scaling.use_gpu
    zero: dict = {"stage": e.zero_stage}
    if e.zero_stage >= 2:
        zero.update(overlap_comm=gpu, contiguous_gradients=True)
    if e.zero_stage == 3:
        zero.update(sub_group_size=e.sub_group_size, stage3_gather_16bit_weights_on_model_save=True)
        if not gpu:
            # Bound what is gathered at once (DeepSpeed's defaults keep up to 1e9 parameters
            # live, i.e. a whole billion-parameter model), so memory per rank shrinks with the
            # world size.
            zero.update(
                stage3_max_live_parameters=e.sub_group_size,
                stage3_max_reuse_distance=e.sub_group_size,
                stage3_prefetch_bucket_size=e.sub_group_size // 10,
            )
    if gpu and e.zero_stage >= 2:
        zero.update(zero_gpu_buckets(e.zero_stage, model_width(cfg)))
    if e.offload_optimizer != "none":
        offload: dict = {"device": e.offload_optimizer, "pin_memory": gpu}
        if e.offload_optimizer == "nvme":
            offload.update(nvme_path=e.nvme_path, buffer_count=4, fast_init=False)
        zero["offload_optimizer"] = offload
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": e.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * e.grad_accum_steps * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no ~60 s fused-op build
        "steps_per_print": 10**9,  # we log; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    precision = resolve_precision(e.precision, gpu)
    if precision == "bf16" and not e.autocast:  # autocast: DeepSpeed sees an fp32 model
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 100}
    if e.offload_optimizer == "nvme":
        ds["aio"] = {
            "block_size": 1 << 20,
            "queue_depth": 8,
            "thread_count": 1,
            "single_submit": False,
            "overlap_events": True,
        }
    return ds


# Modules whose parameters never decay, whatever their shape: lookup tables and normalisers.
NO_DECAY_MODULES = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, InstanceNorm*d
)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups by parameter role: decay the matrices and kernels of linear and convolution
    layers (any >= 2-D parameter, also one a module holds directly, like the dVAE's conv `w`);
    never biases, gains or scalars (< 2-D), nor any parameter of an embedding or norm module.
    The role comes from the owning module's type, not the name (a substring test once took
    `post_quant_conv.weight` for a positional embedding)."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # a tied weight: its first owner decides
                continue
            seen.add(id(p))
            is_matrix = p.ndim >= 2 and not isinstance(module, NO_DECAY_MODULES)
            (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, optimizer: OptimizerSection | None = None
) -> torch.optim.Optimizer:
    o = optimizer or cfg.optimizer
    groups = param_groups(model, o.weight_decay)
    if cfg.engine.offload_optimizer != "none":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    # fused: one multithreaded pass over each tensor (CPU and GPU). On 2 cores, 151M fp32
    # parameters: 0.10 s per step against 0.57 s for the default multi-tensor loop.
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def model_init_context(cfg: TrainConfig, ds_config: dict):
    """Under ZeRO-3 with `zero_init`, parameters are partitioned as they are created."""
    if cfg.engine.zero_stage == 3 and cfg.engine.zero_init:
        import deepspeed

        return deepspeed.zero.Init(config_dict_or_path=ds_config)
    return contextlib.nullcontext()


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block of `model.blocks` in backward; state-dict keys are unchanged. A model
    with its own mechanism (the diffusers U-Net) exposes `enable_activation_checkpointing()`."""
    own = getattr(model, "enable_activation_checkpointing", None)
    if own is not None:
        own()
        return 1
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"{type(model).__name__} has no `blocks` to checkpoint")
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(blocks)


def initialize(cfg: TrainConfig, build_model: Callable[[], nn.Module], world_size: int):
    """Build the model and wrap it in a DeepSpeed engine. Returns (engine, ds_config)."""
    import deepspeed

    ds_config = build_deepspeed_config(cfg, world_size)
    # Adopt the process group Ray Train created (gloo on CPU, nccl on GPU) before zero.Init.
    deepspeed.init_distributed(dist_backend=dist_backend(cfg.scaling.use_gpu))
    with model_init_context(cfg, ds_config):
        model = build_model()
    if cfg.engine.activation_checkpointing:
        apply_activation_checkpointing(model)
    return wrap(cfg, model, ds_config), ds_config


def wrap(
    cfg: TrainConfig, model: nn.Module, ds_config: dict, optimizer: OptimizerSection | None = None
):
    """`deepspeed.initialize` one built module with its own optimizer."""
    import deepspeed

    sync_scalar_params(model, worker_device(cfg.scaling.use_gpu))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=build_optimizer(model, cfg, optimizer),
        config=ds_config,
        dist_init_required=False,  # Ray Train has already set up the process group
    )
    if engine.dp_world_size == 1 and not engine.zero_optimization():
        # One rank without ZeRO has nothing to reduce, yet DeepSpeed would still copy every
        # gradient through its all-reduce buckets after each backward (0.19 s of a 1.5 s step
        # of the 151M DALL-E on 2 cores). ZeRO-1/2/3 need that pass: it fills their partitions.
        engine.enable_backward_allreduce = False
    return engine


@contextlib.contextmanager
def autocast(cfg: TrainConfig, device: torch.device):
    """The forward + loss context of `engine.autocast`: bf16 autocast on `device`, else none."""
    gpu = device.type == "cuda"
    if cfg.engine.autocast and resolve_precision(cfg.engine.precision, gpu) == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def objective_parts(objective) -> tuple[str, ...]:
    """The parts an objective trains, in update order: `("model",)` unless it declares more."""
    parts = tuple(getattr(objective, "parts", (MODEL,)))
    if not parts or len(set(parts)) != len(parts):
        raise ValueError(f"objective {objective.name!r}: parts must be distinct names, got {parts}")
    return parts


def part_optimizer(cfg: TrainConfig, objective, part: str) -> OptimizerSection:
    """A part's optimizer settings: the objective's `optimizer_section(part)` if it has one."""
    section = getattr(objective, "optimizer_section", None)
    return section(part) if section is not None else cfg.optimizer


def check_config(cfg: TrainConfig, objective) -> None:
    """Cross-field checks of the engine settings against each other and the objective. The
    driver runs them before any worker starts (`trainer.launch.build_trainer`); every worker
    runs them again before building engines."""
    e = cfg.engine
    if e.offload_optimizer != "none" and e.zero_stage == 0:
        raise ValueError(
            f"engine.offload_optimizer={e.offload_optimizer} needs engine.zero_stage >= 1 (got 0)"
        )
    gpu = cfg.scaling.use_gpu
    # `auto` for GPU workers cannot be resolved on a driver without a GPU: the workers check it.
    resolvable = e.precision != "auto" or not gpu or torch.cuda.is_available()
    if e.autocast and resolvable and resolve_precision(e.precision, gpu) == "fp16":
        raise ValueError(
            "engine.autocast=true runs bf16 only (fp16 autocast needs a loss scaler): set "
            "engine.precision=bf16, or engine.autocast=false for DeepSpeed's fp16 mode"
        )
    parts = objective_parts(objective)
    if len(parts) > 1 and e.zero_stage == 3:
        raise ValueError(
            f"objective={cfg.objective} trains {len(parts)} parts ({', '.join(parts)}) with an "
            f"optimizer each, which needs engine.zero_stage <= 2 (got 3)"
        )


def initialize_parts(cfg: TrainConfig, objective, world_size: int) -> dict[str, object]:
    """One DeepSpeed engine per part of `objective`, in update order (see the module docstring).

    A single-part objective goes through `initialize` unchanged (ZeRO-3 and zero.Init included);
    several parts need `engine.zero_stage <= 2`: freezing a part with `requires_grad` and running
    one engine's module inside another's forward are not supported on ZeRO-3 partitions."""
    import deepspeed

    check_config(cfg, objective)
    parts = objective_parts(objective)
    if len(parts) == 1:
        engine, _ = initialize(cfg, objective.build_model, world_size)
        return {parts[0]: engine}
    deepspeed.init_distributed(dist_backend=dist_backend(cfg.scaling.use_gpu))
    modules = objective.build_parts()
    if list(modules) != list(parts):
        raise ValueError(
            f"objective {objective.name!r}: build_parts() returned {list(modules)}, "
            f"its parts are {list(parts)}"
        )
    if cfg.engine.activation_checkpointing:
        with_blocks = [m for m in modules.values() if hasattr(m, "blocks")]
        if not with_blocks:
            raise ValueError(f"objective={cfg.objective}: no part has `blocks` to checkpoint")
        for m in with_blocks:
            apply_activation_checkpointing(m)
    engines = {}
    for part, module in modules.items():
        o = part_optimizer(cfg, objective, part)
        engines[part] = wrap(cfg, module, build_deepspeed_config(cfg, world_size, o), o)
    return engines


@contextlib.contextmanager
def trains_only(engines: dict, part: str):
    """Within the block, only `part`'s parameters require grad (Lightning's `toggle_optimizer`):
    a loss that also runs another part (the generator loss through the discriminator) records
    no gradient path to that part's parameters. A no-op with one part."""
    frozen = [
        p
        for name, engine in engines.items()
        if name != part
        for p in engine.module.parameters()
        if p.requires_grad
    ]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def set_full_param(param: nn.Parameter, value: torch.Tensor) -> None:
    """Overwrite a parameter everywhere the engine keeps it: the optimizer's fp32 master copy
    (ZeRO-1/2 partitions, bf16 optimizer) and the module's working copy. Every rank must call it
    with the same value (e.g. dead-code restarts of a codebook)."""
    from deepspeed.utils import safe_set_full_fp32_param

    safe_set_full_fp32_param(param, value.float())
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def sync_scalar_params(model: nn.Module, device: torch.device) -> None:
    """DeepSpeed 0.19 broadcasts parameters as byte views, which fails for 0-dim tensors (CLIP's
    `logit_scale`). Broadcast those from rank 0 here and flag them so DeepSpeed skips them.
    This runs before DeepSpeed moves the model to `device` (the worker's GPU or the CPU): the
    value travels on `device` (NCCL takes CUDA tensors only), through `tdist.dist_broadcast`."""
    for p in model.parameters():
        if p.dim() == 0 and not hasattr(p, "ds_id"):  # ZeRO-3 partitioned params are not ours
            value = tdist.dist_broadcast(p.data, device, src=0)
            p.data.copy_(value.reshape(()).to(p.device, p.dtype))
            p.ds_optim_param = True  # DeepSpeed's own marker for "do not broadcast"


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def engine_state_bytes(engine) -> int:
    """Bytes of model state this rank's engine holds, summed over DeepSpeed's own tensors, each
    storage once: the module's parameters (ZeRO-3: this rank's partition, `ds_tensor`) and
    gradients, every tensor the ZeRO / mixed-precision optimizer wrapper keeps (fp32 master
    partitions, flat gradient partitions, bucket buffers) and the inner optimizer's state (Adam
    moments). What ZeRO partitions shrinks with the world size; what it does not (persistent
    small parameters, fixed-size buckets) is counted too. Activations are not model state."""
    storages: dict[tuple, int] = {}

    def add(x, depth: int = 0) -> None:
        if isinstance(x, torch.Tensor):
            if x.device.type != "meta" and x.numel():
                st = x.untyped_storage()
                storages[(str(x.device), st.data_ptr())] = st.nbytes()
        elif depth < 2 and isinstance(x, (list, tuple)):
            for v in x:
                add(v, depth + 1)
        elif depth < 2 and isinstance(x, dict):
            for v in x.values():
                add(v, depth + 1)

    for p in engine.module.parameters():
        add(getattr(p, "ds_tensor", p.data))
        add(p.grad)
    opt = engine.optimizer
    for v in vars(opt).values():
        add(v)
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        add(state)
    return sum(storages.values())


def local_params_finite(engine) -> bool:
    """True when this rank's parameter shards are all finite (ZeRO-3 shards via `ds_tensor`)."""
    for p in engine.module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        if t.numel() and not torch.isfinite(t).all():
            return False
    return True


def export_module_state(engine) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0, None elsewhere. A collective: every rank must call it.

    fp32 runs export the weights themselves (ZeRO-3 partitions gathered). bf16/fp16 runs export
    DeepSpeed's fp32 master weights, not the low-precision working copies cast up (which lose
    every bit below bf16's 8): `safe_get_full_fp32_param` assembles each from the optimizer's
    partitions (ZeRO-1/2/3, and ZeRO-0's bf16 optimizer) — a collective per parameter, in the
    same order on every rank. Buffers are exported as held."""
    from deepspeed.utils import safe_get_full_fp32_param

    if engine.zero_optimization_partition_weights():  # ZeRO-3: gather (collective on all ranks)
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict() if engine.global_rank == 0 else None
    named = list(engine.module.named_parameters(remove_duplicate=False))  # tied: every name
    if any(p.dtype != torch.float32 for _, p in named):
        done: dict[int, str] = {}  # tied parameters: assembled once, shared by every name
        for name, p in named:
            if id(p) in done:
                if sd is not None and name in sd:
                    sd[name] = sd[done[id(p)]]
                continue
            done[id(p)] = name
            full = safe_get_full_fp32_param(p)  # every rank; only rank 0 keeps it
            if sd is not None and name in sd and full is not None:
                sd[name] = full.reshape(sd[name].shape).cpu()
    if engine.global_rank != 0 or sd is None:
        return None
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in sd.items()}


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


def objective_engines(engines: dict):
    """What an objective's methods get: its one engine (single-part objectives, the original
    API), or the dict of engines by part name (multi-part objectives)."""
    return next(iter(engines.values())) if len(engines) == 1 else engines


def engine_device(engines: dict) -> torch.device:
    """The device this rank computes on (every part's engine shares it): where every tensor
    handed to a collective lives (NCCL takes CUDA tensors only)."""
    return next(iter(engines.values())).device
