"""The one training loop, run by every Ray Train worker, for every objective.

    cfg      <- TrainConfig rebuilt from the dict Ray passed (never a module global)
    engines  <- trainer.engine.initialize_parts(objective): {"model": engine} or one per part
    resume   <- newest COMPLETE checkpoint under <storage>/<name>, if any (every part);
                save and resume live in trainer/checkpoint.py
    loop     :  batch -> on_step(step) -> loss of each part -> guard -> per part: backward, step
                -> report (+ log_images) ; one code path: ordinary objectives have one part
                every N steps: checkpoint (all ranks upload, rank 0 writes the manifest last)
    callbacks:  what watches or perturbs the loop (the EMA, fault injection, the non-finite
                guard) is called at fixed events: trainer/callbacks.py

Exactly-once data: the dataset order is deterministic (Ray Data `preserve_order`, seeded
shuffles), so each rank sees the same stream of batches in every attempt; the checkpoint records
how many batches this epoch consumed and a resumed run skips exactly those.
"""

from __future__ import annotations

import torch

from data_pipeline import fs
from data_pipeline.config import from_dict
from data_pipeline.devices import enable_tf32
from trainer import checkpoint as ckpt_io
from trainer.callbacks import NonFiniteGuard
from trainer.config import TrainConfig
from trainer.engine import (
    apply_worker_device,
    autocast,
    engine_device,
    initialize_parts,
    native_bf16,
    objective_engines,
    part_optimizer,
    resolve_precision,
    set_lr,
    trains_only,
)
from trainer.faults import FaultInjector
from trainer.metrics import MetricsLogger, current_rss_gib, peak_flops
from trainer.objectives import build_objective
from trainer.schedules import compute_lr


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: `config = {"cfg": asdict(TrainConfig)}`."""
    import ray.train
    from ray.train import CheckpointUploadMode

    cfg = from_dict(TrainConfig, config["cfg"], source="train_loop_per_worker")
    # The device follows Ray's reservation; set before CUDA initialises or DeepSpeed is imported.
    device = apply_worker_device(cfg.scaling.use_gpu)
    enable_tf32(device)  # fp32 matmuls on TF32 tensor cores on a GPU worker (no-op on CPU)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Where each rank runs (tests and operators check the placement strategy from these lines).
    print(
        f"[t2i] rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()}", flush=True
    )
    if not cfg.scaling.use_gpu:  # CPU ranks compute with the cores they reserved, no more
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and every attempt

    objective = build_objective(cfg)
    rss_before_init = current_rss_gib()
    engines = initialize_parts(cfg, objective, world)
    parts = list(engines)
    optimizers = {p: part_optimizer(cfg, objective, p) for p in parts}
    run = run_location(cfg)
    # Per-rank stream for dropout and caption noise; a resume restores each rank's saved state,
    # so an interrupted run draws exactly what the uninterrupted one would have.
    torch.manual_seed(cfg.seed * 1000 + rank + 1)
    # The objective's own (the EMA, trainer/ema.py), then fault injection (off by default)
    callbacks = [*getattr(objective, "callbacks", ()), FaultInjector(cfg, run)]
    for cb in callbacks:
        cb.on_engines(engines, rank, world)
    state = ckpt_io.resume(engines, run, rank, callbacks)

    shard = ray.train.get_dataset_shard("train")
    gpu = device.type == "cuda"
    precision = resolve_precision(cfg.engine.precision, gpu)
    if rank == 0:
        print(f"[t2i] precision {precision} (engine.precision={cfg.engine.precision})", flush=True)
        if precision == "bf16" and not native_bf16(gpu):
            print(
                "[t2i] warning: engine.precision=bf16 on hardware without native bf16 (no "
                "AVX512-BF16/AMX on this CPU): it is emulated, 10-80x slower than fp32; "
                "use engine.precision=auto",
                flush=True,
            )
    peak = cfg.peak_tflops * 1e12 or peak_flops(device, precision)
    logger = MetricsLogger(cfg, rank, world, objective, peak, device=engine_device(engines))
    logger.rss_before_init = rss_before_init
    guard = NonFiniteGuard(cfg.engine.max_bad_steps, engine_device(engines))
    micro_in_step = 0
    on_step = getattr(objective, "on_step", None)
    # Optional: the objective regroups each epoch's batches (ldm aspect-ratio buckets)
    regroup = getattr(objective, "batch_regrouper", lambda world: None)(world)
    while state.step < cfg.steps:
        seen_in_pass = 0
        for batch in iter_epoch(shard, cfg, state, regroup):
            seen_in_pass += 1
            state.batches_in_epoch += 1
            for cb in callbacks:
                cb.on_batch(batch, state)
            if on_step is not None:
                on_step(state.step)  # schedules (Gumbel tau, KL warm-up, discriminator start)
            active = active_parts(objective, parts, state.step)
            losses, metrics = compute_losses(cfg, objective, engines, batch, active)
            for cb in callbacks:
                losses[parts[0]] = cb.on_loss(losses[parts[0]], state.step)
            if not guard.losses_ok(losses):  # skipped on every rank together
                state.skipped_steps += 1
                logger.skipped(state, "non-finite loss")
                continue
            for part in active:  # in order: e.g. the generator, then the discriminator
                o = optimizers[part]
                set_lr(
                    engines[part],
                    compute_lr(
                        state.step,
                        lr=o.lr,
                        warmup_steps=o.warmup_steps,
                        total_steps=cfg.steps,
                        min_lr_ratio=o.min_lr_ratio,
                    ),
                )
                engines[part].backward(losses[part])
                engines[part].step()
            micro_in_step += 1
            logger.accumulate(losses[parts[0]], metrics, batch)
            if micro_in_step < cfg.engine.grad_accum_steps:
                continue
            micro_in_step = 0
            # DeepSpeed found non-finite gradients (bf16/fp16) in some part: not a step.
            if not guard.step_applied(engines, active):
                state.skipped_steps += 1
                logger.skipped(state, guard.skip_reason)
                continue
            guard.step_done()
            state.step += 1
            for cb in callbacks:
                cb.on_step_end(engines, state.step)
            state.samples_seen += cfg.data.batch_size * cfg.engine.grad_accum_steps * world
            last = state.step >= cfg.steps
            every = cfg.checkpoint.every_steps
            ckpt_step = (last and cfg.checkpoint.at_end) or bool(every and state.step % every == 0)
            metrics = logger.step(engines, state, force=ckpt_step or last)
            if metrics is not None:
                with logger.apart():  # observability, not training: out of the throughput
                    log_images(objective, engines, batch, logger, state.step)
            checkpoint = None
            if ckpt_step:  # timed: its seconds go to the dashboard, not into the throughput
                with logger.checkpointing(state.step):
                    checkpoint = ckpt_io.save(
                        engines, cfg, run, state, rank, world, objective, callbacks, export=last
                    )
            if metrics is not None:
                # Every rank reports (it is a barrier); rank 0 registers the checkpoint, already
                # complete in storage, so Ray's Result and dashboard point at it.
                ray.train.report(
                    metrics,
                    checkpoint=checkpoint,
                    checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
                )
            for cb in callbacks:
                cb.on_step_done(state.step, checkpointed=ckpt_step)
            if last:
                break
        else:
            if seen_in_pass == 0 and state.batches_in_epoch == 0:
                raise ValueError(
                    f"the dataset gives rank {rank} no full batch of data.batch_size="
                    f"{cfg.data.batch_size}: it needs at least batch_size x workers rows"
                )
            state.epoch += 1
            state.batches_in_epoch = 0
    logger.close()


def run_location(cfg: TrainConfig) -> fs.Location:
    """This run's directory, on the filesystem Ray Train was given: checkpoints written there are
    'managed' by Ray (registered without a second upload) and found again on resume."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    uri = f"{cfg.checkpoint.storage_path.rstrip('/')}/{cfg.name}"
    return fs.Location(storage.storage_filesystem, storage.experiment_fs_path, uri)


def active_parts(objective, parts: list[str], step: int) -> list[str]:
    """The parts updated at optimizer step `step`: all, unless the objective's optional
    `active_parts(step)` says fewer (a discriminator before its start step). The first part
    always trains. A function of the step only, so every rank agrees."""
    hook = getattr(objective, "active_parts", None)
    if hook is None:
        return parts
    active = [p for p in parts if p in set(hook(step))]
    if not active or active[0] != parts[0]:
        raise ValueError(
            f"objective {objective.name!r}: active_parts({step}) must include {parts[0]!r}"
        )
    return active


def compute_losses(cfg: TrainConfig, objective, engines: dict, batch, active: list[str]):
    """Each active part's loss, its forward run under `trains_only(part)` (and bf16 autocast with
    `engine.autocast`), and the merged metrics.
    Single-part objectives: `loss(engine, batch)`; multi-part: `loss(engines, batch, part)`, and
    each extra part's loss is also reported as `loss_<part>`.

    Every loss is computed before any part steps: one finiteness check then covers the whole
    micro-batch, so all parts skip together and their DeepSpeed micro-step counters stay aligned
    under gradient accumulation. (A GAN's discriminator therefore sees the reconstruction from
    before the generator's step, the usual detached fake; taming recomputes it after the step.)"""
    losses, metrics = {}, {}
    view = objective_engines(engines)
    for i, part in enumerate(active):
        with trains_only(engines, part), autocast(cfg, engine_device(engines)):
            if len(engines) == 1:
                loss, m = objective.loss(view, batch)
            else:
                loss, m = objective.loss(view, batch, part)
        losses[part] = loss
        metrics.update(m)
        if i:
            metrics[f"loss_{part}"] = loss.detach()
    return losses, metrics


def log_images(objective, engines: dict, batch, logger: MetricsLogger, step: int) -> None:
    """Optional objective hook `log_images(engine, batch) -> {name: uint8 (H, W, 3)}` at log steps.

    Every rank runs it (under ZeRO-3 a forward pass is a collective); rank 0 writes the PNGs and
    TensorBoard images. The model is in eval mode under no_grad, and the RNG is forked so that
    logging images never changes the training trajectory (resume stays bit-exact).
    """
    hook = getattr(objective, "log_images", None)
    if hook is None:
        return
    for engine in engines.values():
        engine.eval()
    try:
        device = engine_device(engines)  # a CPU rank forks the CPU generator only
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            images = hook(objective_engines(engines), batch)
    finally:
        for engine in engines.values():
            engine.train()
    logger.images(images, step)


PREFETCH_BATCHES = 2  # batches Ray Data prepares ahead of the one training (Ray's default: 1)


def iter_epoch(shard, cfg: TrainConfig, state: ckpt_io.TrainState, regroup=None):
    """This rank's batches for `state.epoch`, skipping those a previous attempt consumed;
    `regroup` (the objective's, optional) maps the batch stream to the one trained on (a pure
    function of it, so the skip stays exact) and gives every rank the same number."""
    skip = state.batches_in_epoch
    seed = cfg.data.shuffle_seed * 100_003 + state.epoch
    it = shard.iter_torch_batches(
        batch_size=cfg.data.batch_size,
        drop_last=True,  # every rank takes the same number of steps
        local_shuffle_buffer_size=cfg.data.local_shuffle_buffer or None,
        local_shuffle_seed=seed if cfg.data.local_shuffle_buffer else None,
        # Two batches in flight while one trains; a GPU rank's batches are collated into pinned
        # host memory, so the copy to the GPU is a fast DMA (Ray 2.60 `pin_memory`, alpha).
        prefetch_batches=PREFETCH_BATCHES,
        pin_memory=cfg.scaling.use_gpu,
    )
    if regroup is not None:
        it = regroup(it)
    for i, batch in enumerate(it):
        if i >= skip:
            yield batch
