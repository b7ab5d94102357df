"""`t2i train`: one engine for every objective (Ray Train workers x DeepSpeed ZeRO).

t2i train --config jobs/configs/dalle_digits.yaml [key.sub=value ...] [--address ADDR]
python -m jobs.train --config ...                   # same; usable with `ray job submit`
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import add_config_arguments, load_job_config, run_module
from trainer.config import TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (objective from the config) with Ray Train + DeepSpeed",
        description=(
            "Train with Ray Train (scaling.num_workers ranks) and DeepSpeed ZeRO "
            "(engine.zero_stage). Checkpoints go to checkpoint.storage_path/<name>; re-running "
            "the same name resumes from its newest complete checkpoint. Metrics appear in the "
            "Ray dashboard and as TensorBoard events."
        ),
    )
    add_config_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from data_pipeline.config import to_yaml
    from jobs.common import init_ray
    from trainer.launch import default_data_cpus, fit, worker_env

    cfg = load_job_config(TrainConfig, args)
    print(
        f"train: {cfg.name} objective={cfg.objective} workers={cfg.scaling.num_workers} "
        f"zero={cfg.engine.zero_stage} precision={cfg.engine.precision} steps={cfg.steps}"
    )
    s = cfg.scaling
    # Each worker reserves its CPUs; the data path reserves its own (at least 2 locally).
    data = s.data_cpus if s.data_cpus is not None else default_data_cpus(s, cfg.objective)
    init_ray(
        cfg.ray,
        runtime_env={"env_vars": worker_env()},
        min_cpus=s.num_workers * s.cpus_per_worker + max(2.0, data),
    )
    result = fit(cfg)
    if result.error:
        print(f"train: failed: {result.error}", file=sys.stderr)
        return 1
    print(f"train: done; last metrics: {result.metrics}")
    print(f"train: resolved config:\n{to_yaml(cfg)}", end="")
    return 0


if __name__ == "__main__":
    run_module("train")
