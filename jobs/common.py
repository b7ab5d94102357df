"""What the Ray-using entry points share: connecting to Ray with safe defaults, and the
summary the data jobs print."""

from __future__ import annotations

import math
import os

from data_pipeline.config import RayConfig


def init_ray(cfg: RayConfig, *, runtime_env: dict | None = None, min_cpus: float = 0):
    """Connect to `cfg.address` / $RAY_ADDRESS, or start a local instance.

    A local instance advertises at least `min_cpus` logical CPUs: training workers each reserve
    CPUs, and Ray Data's feeding tasks need some left over, or they would wait forever.

    Ray's token authentication stays on (Ray 2.60 default: `~/.ray/auth_token`). A local
    instance's dashboard binds to 127.0.0.1 only; a cluster's binding is the cluster's setting.
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if not _has_cuda():  # silences DeepSpeed's accelerator warning in this CPU-only process
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Never `cuda` on a GPU host: a local Ray started here inherits this environment, and
    # training workers decide their accelerator from scaling.use_gpu (trainer.engine).
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # Inside a submitted job: the job's runtime env (working dir, env vars) already applies,
        # and Ray refuses a driver runtime env that repeats its keys.
        return ray.init(address=address or "auto", log_to_driver=True)
    if address:
        return ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(min_cpus))
    return ray.init(
        num_cpus=num_cpus,
        include_dashboard=cfg.dashboard,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env,
    )


def print_left_out(command: str, reasons: dict[str, int], output: str) -> None:
    """A data job's closing lines: how many samples each reason left out, and the output."""
    for reason, count in reasons.items():
        print(f"{command}:   {reason:<20} {count}")
    print(f"{command}: output -> {output}")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
