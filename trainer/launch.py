"""Driver side of `t2i train`: build the TorchTrainer from the typed config and run it."""

from __future__ import annotations

import dataclasses
import os

from data_pipeline import fs
from trainer.config import TrainConfig
from trainer.loop import train_loop_per_worker
from trainer.objectives import build_objective


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
        clip=dataclasses.replace(cfg.clip, model_config=fix(cfg.clip.model_config)),
        vqgan=dataclasses.replace(
            cfg.vqgan,
            perceptual_weights=fix(cfg.vqgan.perceptual_weights),
            init_from=fix(cfg.vqgan.init_from),
        ),
    )


def build_trainer(cfg: TrainConfig):
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = absolutize(cfg)
    storage = fs.resolve(
        cfg.checkpoint.storage_path,
        endpoint_url=cfg.storage.endpoint_url,
        region=cfg.storage.region,
    )
    ingest = ray.train.DataConfig.default_ingest_options()
    ingest.preserve_order = True
    dataset = build_objective(cfg).dataset()
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
        ),
        datasets={"train": dataset},
        # Deterministic split: each rank sees the same batches in every attempt (exact resume).
        dataset_config=ray.train.DataConfig(execution_options=ingest),
    )


def worker_env() -> dict[str, str]:
    """Environment the workers need, forwarded through the runtime env (never credentials)."""
    keys = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    return {k: os.environ[k] for k in keys if k in os.environ}


def fit(cfg: TrainConfig):
    """Run training to `cfg.steps`; returns Ray's Result (metrics of the last report)."""
    return build_trainer(cfg).fit()
