"""Driver side of `t2i train`: build the TorchTrainer from the typed config and run it."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import threading
import time

from data_pipeline import fs
from trainer.config import ScalingSection, TrainConfig
from trainer.engine import check_config, worker_device_env
from trainer.faults import check_faults
from trainer.loop import train_loop_per_worker
from trainer.objectives import build_objective
from trainer.progress import Progress


def absolutize(cfg: TrainConfig) -> TrainConfig:
    """Workers run in other directories: make local paths absolute on the driver."""

    def fix(path: str) -> str:
        return path if not path or path.startswith("s3://") else fs.resolve(path).path

    return dataclasses.replace(
        cfg,
        checkpoint=dataclasses.replace(
            cfg.checkpoint, storage_path=fix(cfg.checkpoint.storage_path)
        ),
        data=dataclasses.replace(cfg.data, path=fix(cfg.data.path)),
        ldm=dataclasses.replace(
            cfg.ldm, autoencoder=fix(cfg.ldm.autoencoder), init_from=fix(cfg.ldm.init_from)
        ),
        clip=dataclasses.replace(cfg.clip, model_config=fix(cfg.clip.model_config)),
        vqgan_train=dataclasses.replace(
            cfg.vqgan_train,
            perceptual_weights=fix(cfg.vqgan_train.perceptual_weights),
            init_from=fix(cfg.vqgan_train.init_from),
        ),
    )


# Objectives whose training data path decodes images on the CPU (the others read tokens/latents).
IMAGE_OBJECTIVES = ("clip", "dvae", "vqgan", "klae")


def default_data_cpus(s: ScalingSection, objective: str) -> float:
    """`scaling.data_cpus` when unset: CPUs for the Ray Data tasks, scaled with the workers.
    Per worker: 2 for an image objective on GPU workers (decoding and resizing images on the CPU
    for a GPU's step rate), 0.5 for token/latent objectives (Parquet reads and collation); CPU
    workers step about 50x slower and get a quarter of that. At least 1: 2 CPU workers keep the
    single data CPU they always had, 16 GPU workers get 32 (images) or 8 (tokens)."""
    per_worker = 2.0 if objective in IMAGE_OBJECTIVES else 0.5
    if not s.use_gpu:
        per_worker /= 4
    return float(max(1, math.ceil(per_worker * s.num_workers)))


def data_cpus(cfg: TrainConfig, objective) -> float:
    """CPUs reserved for the run's Ray Data tasks: `scaling.data_cpus` (unset:
    `default_data_cpus`), at least what the objective's data path holds at once
    (`data_cpus_min`, e.g. a reader + a tokenizer actor); 0 turns the reservation off."""
    cpus = cfg.scaling.data_cpus
    if cpus is None:
        cpus = default_data_cpus(cfg.scaling, cfg.objective)
    if cpus <= 0:
        return 0.0
    return max(cpus, float(getattr(objective, "data_cpus_min", 1.0)))


@contextlib.contextmanager
def data_reservation(cfg: TrainConfig, cpus: float):
    """A placement group of `cpus` CPUs (one bundle) for the run's Ray Data tasks while the run
    lasts; yields the scheduling strategy that puts them there (None when cpus is 0).

    Why: the training workers sit in Ray Train's own placement group. When a node dies, Ray
    Train restarts the group on what is left, and without a reservation the workers can take
    every CPU there: the data tasks that feed them then never run and the run hangs (seen on a
    2-node cluster). Reserved CPUs are the data path's alone; when the cluster cannot hold both
    reservations, the capacity watch says what is missing."""
    if cpus <= 0:
        yield None
        return
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": cpus}], strategy="STRICT_PACK", name=f"t2i-data-{cfg.name}")
    try:
        yield PlacementGroupSchedulingStrategy(pg)
    finally:
        remove_placement_group(pg)


@contextlib.contextmanager
def data_scheduling(strategy):
    """Within the block, Ray Data operators being built take `strategy` (None: unchanged).

    A read fixes its tasks' strategy from the current DataContext when it is called, and the
    dataset keeps a copy of that context for the operators after it: so the strategy is set
    while the objective builds its dataset, and every read, map task and actor pool of it (and of
    its materialisation) goes to the reservation; large-argument tasks too (Ray Data schedules
    those apart). Ray 2.60 marks these two DataContext fields deprecated (to be removed after
    January 2027) without a replacement for placing a dataset's tasks; the warning is muted."""
    if strategy is None:
        yield
        return
    import warnings

    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.scheduling_strategy, ctx.scheduling_strategy_large_args
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*scheduling_strategy.* is deprecated")
        ctx.scheduling_strategy = ctx.scheduling_strategy_large_args = strategy
        try:
            yield
        finally:
            ctx.scheduling_strategy, ctx.scheduling_strategy_large_args = saved


def build_trainer(cfg: TrainConfig, data_strategy=None):
    """The TorchTrainer of `cfg`; `data_strategy` (from `data_reservation`) places the training
    dataset's tasks and actors."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = absolutize(cfg)
    # endpoint, region, retries, timeouts, part size for checkpoint I/O
    storage = fs.resolve(cfg.checkpoint.storage_path, storage=cfg.storage)
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    objective = build_objective(cfg)
    check_config(cfg, objective)  # cross-field errors here, before any worker starts
    check_faults(cfg.faults)
    with data_scheduling(data_strategy):
        dataset = objective.dataset()
    if cfg.data.cache:
        # Same order in every run (exact resume across `t2i train` invocations): the dataset
        # executes with its own copy of the DataContext, taken when it was built, so the flag
        # goes there (setting it on `DataContext.get_current()` now would not reach it).
        dataset.context.execution_options.preserve_order = True
        dataset = dataset.materialize()
    s = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker},
            placement_strategy=s.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            # Our resolver builds the filesystem (endpoint/region from config or AWS env);
            # Ray Train and our checkpoint code then share it.
            storage_path=storage.path,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.failure_max_retries),
            worker_runtime_env=worker_runtime_env(cfg),
        ),
        datasets={"train": dataset},
        # Deterministic split: each rank sees the same batches in every attempt (exact resume).
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )


def worker_env() -> dict[str, str]:
    """Environment the workers need, forwarded through the runtime env (never credentials).
    Never `DS_ACCELERATOR`: each training worker's accelerator follows its own reservation
    (`worker_runtime_env`), not the driver's shell (the Makefile exports `cpu`)."""
    keys = ("TORCH_EXTENSIONS_DIR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    return {k: os.environ[k] for k in keys if k in os.environ}


def worker_runtime_env(cfg: TrainConfig) -> dict:
    """The runtime env of the training workers: `DS_ACCELERATOR` from `scaling.use_gpu`, and no
    visible GPU for CPU workers (`worker_device_env`), set when each worker process starts, before
    Ray Train's own setup first asks CUDA for devices."""
    return {"env_vars": worker_device_env(cfg.scaling.use_gpu)}


class CapacityError(RuntimeError):
    """The cluster could not hold the run (scaling.on_capacity_shortage=fail)."""


def capacity_need(s: ScalingSection, data_cpus: float | None = None) -> dict[str, float]:
    """What the run occupies at once: every worker's reservation, plus the CPUs reserved for its
    Ray Data tasks (`data_cpus`, default `s.data_cpus`; without those, the workers wait for
    batches that never come)."""
    data = data_cpus
    if data is None:
        data = s.data_cpus if s.data_cpus is not None else default_data_cpus(s, "")
    need = {"CPU": s.num_workers * s.cpus_per_worker + data}
    if s.use_gpu:
        need["GPU"] = float(s.num_workers)
    return need


def missing_resources(need: dict[str, float], total: dict[str, float]) -> dict[str, float]:
    """{resource: shortfall} of `need` against the alive nodes' `total`."""
    return {k: v - total.get(k, 0.0) for k, v in need.items() if total.get(k, 0.0) < v}


def interrupt_main_thread() -> None:
    """Raise KeyboardInterrupt in the main thread (where `fit` waits). Not `_thread.interrupt_main`:
    that delivers SIGINT, which does nothing once a library has set SIGINT to SIG_IGN/SIG_DFL
    (seen in the test suite); an asynchronous exception arrives at the main thread's next
    bytecode whatever the signal handlers are."""
    ident = threading.main_thread().ident
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                               ctypes.py_object(KeyboardInterrupt))  # fmt: skip


class CapacityWatch(threading.Thread):
    """Driver side, beside `fit`: polls the alive nodes' resources. When they stay short of
    `capacity_need` for `capacity_wait_s` (a node died, none replaced it yet), it prints what
    is missing, and again every `capacity_wait_s`; with `on_capacity_shortage=fail` it then
    stops the run (interrupting `fit` in the main thread) instead of waiting for nodes."""

    def __init__(self, s: ScalingSection, poll_s: float = 1.0, data_cpus: float | None = None):
        super().__init__(name="t2i-capacity-watch", daemon=True)
        self.s, self.need, self.poll_s = s, capacity_need(s, data_cpus), poll_s
        self.data_cpus = self.need["CPU"] - s.num_workers * s.cpus_per_worker
        self.stopped = threading.Event()
        self.failure: str | None = None

    def describe(self, missing: dict[str, float], waited: float) -> str:
        need = ", ".join(f"{k} {v:g}" for k, v in self.need.items())
        short = ", ".join(f"{k} {v:g}" for k, v in missing.items())
        s = self.s
        return (
            f"[t2i] capacity: the cluster's alive nodes are short of {short} for {waited:.0f}s: "
            f"this run needs {need} ({s.num_workers} workers x {s.cpus_per_worker:g} CPU "
            f"+ {self.data_cpus:g} reserved for its Ray Data tasks, scaling.data_cpus)"
        )

    def run(self) -> None:
        import ray

        short_since, told = None, 0.0
        while not self.stopped.wait(self.poll_s):
            try:
                missing = missing_resources(self.need, ray.cluster_resources())
            except Exception:  # the driver is shutting down
                return
            now = time.monotonic()
            if not missing:
                if short_since is not None and told:
                    print("[t2i] capacity: enough resources again", flush=True)
                short_since, told = None, 0.0
                continue
            short_since = short_since or now
            waited = now - short_since
            if waited < self.s.capacity_wait_s or now - told < self.s.capacity_wait_s:
                continue
            told = now
            if self.s.on_capacity_shortage == "fail":
                self.failure = self.describe(missing, waited) + (
                    "; stopping (scaling.on_capacity_shortage=fail)"
                )
                print(self.failure, flush=True)
                interrupt_main_thread()
                return
            print(
                self.describe(missing, waited)
                + "; waiting for nodes to join (scaling.on_capacity_shortage=wait)",
                flush=True,
            )


class TrainProgress(threading.Thread):
    """Driver side, beside `fit`: a progress line (steps, ETA, loss, throughput) from the rows
    rank 0 appends to `<storage>/<name>/tensorboard/metrics.jsonl` at each log step (with s3://
    storage the file is uploaded at checkpoints, so the line moves then)."""

    def __init__(self, cfg: TrainConfig, poll_s: float = 5.0, out=None):
        super().__init__(name="t2i-train-progress", daemon=True)
        self.cfg, self.loc = cfg, None
        self.poll_s, self.stopped = poll_s, threading.Event()
        self.progress = Progress(f"train {cfg.name}", cfg.steps, "steps", every_s=30.0, out=out)

    def begin(self) -> None:
        """A resumed run starts where its log ends (read in the thread: `fit` never waits)."""
        self.progress.done = self.progress.start = int(self.read_last_row().get("step", 0))

    def read_last_row(self) -> dict:
        """`last_row()`, or {} when storage cannot be read now. The progress line is a display:
        it must never fail a training run, so any storage error only skips this poll."""
        try:
            if self.loc is None:
                c = self.cfg
                base = fs.resolve(c.checkpoint.storage_path, storage=c.storage)
                self.loc = base.join(c.name, "tensorboard", "metrics.jsonl")
            return self.last_row()
        except Exception:  # noqa: BLE001 - see the docstring
            return {}

    def last_row(self) -> dict:
        """The newest complete row of metrics.jsonl ({} before the first log step)."""
        if not fs.exists(self.loc):
            return {}
        for line in reversed(fs.read_bytes(self.loc).decode("utf-8").splitlines()):
            try:
                return json.loads(line)
            except ValueError:  # the line being written: the next poll reads it whole
                continue
        return {}

    def poll(self) -> None:
        row = self.read_last_row()
        step = int(row.get("step", 0))
        if step > self.progress.done:
            fields = {k: f"{row[k]:.4g}" for k in ("loss", "samples_per_s") if k in row}
            self.progress.update(step - self.progress.done, **fields)

    def run(self) -> None:
        self.begin()
        while not self.stopped.wait(self.poll_s):
            self.poll()


def fit(cfg: TrainConfig):
    """Run training to `cfg.steps`; returns Ray's Result (metrics of the last report).
    Never waits silently for capacity (`CapacityWatch`); shows progress (`TrainProgress`)."""
    cpus = data_cpus(cfg, build_objective(cfg))
    watch = CapacityWatch(cfg.scaling, data_cpus=cpus)
    with data_reservation(cfg, cpus) as data_strategy:
        trainer = build_trainer(cfg, data_strategy)
        progress = TrainProgress(cfg)
        watch.start()
        progress.start()
        try:
            return trainer.fit()
        except KeyboardInterrupt:
            if watch.failure:
                raise CapacityError(watch.failure.removeprefix("[t2i] ")) from None
            raise
        finally:
            watch.stopped.set()
            progress.stopped.set()
