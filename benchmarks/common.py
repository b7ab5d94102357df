"""What the training benchmarks (`benchmarks.train`, `benchmarks.ldm`) share: a run read back
from its metrics log, and their large-preset part — 2 workers, ZeRO-3 with the optimizer state
offloaded to disk (ZeRO-Infinity), no final checkpoint — whose failure prints as a figure of 0."""

from __future__ import annotations

import contextlib
import os
import shutil

from trainer.config import TrainConfig
from trainer.launch import fit
from trainer.metrics import read_metrics_rows


def fit_logged(cfg: TrainConfig) -> list[dict]:
    """Train `cfg` (its error raised) and return the rows it logged to metrics.jsonl (these runs
    write no final checkpoint: the log holds their figures)."""
    res = fit(cfg)
    if res.error:
        raise res.error
    run = os.path.join(cfg.checkpoint.storage_path, cfg.name)
    return read_metrics_rows(os.path.join(run, "tensorboard", "metrics.jsonl"))


def offload_overrides(nvme_path: str) -> list[str]:
    """2 workers x 1 CPU, ZeRO-3 + activation checkpointing, the optimizer state on disk at
    `nvme_path`, batch 1 of 16 synthetic samples, a log row per step."""
    return ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "engine.zero_stage=3",
            "engine.activation_checkpointing=true", "engine.offload_optimizer=nvme",
            f"engine.nvme_path={nvme_path}", "data.batch_size=1", "log_every=1",
            "data.synthetic_samples=16"]  # fmt: skip


@contextlib.contextmanager
def offloaded_run(what: str, nvme_path: str):
    """Around an offloaded run: `nvme_path` emptied before and after, and an exception printed
    ("<what> run failed: ...") instead of raised, so the run's figures keep their 0 defaults."""
    shutil.rmtree(nvme_path, ignore_errors=True)
    try:
        yield
    except Exception as e:  # report, don't hide: the figure is 0 with the reason printed
        print(f"{what} run failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    shutil.rmtree(nvme_path, ignore_errors=True)
