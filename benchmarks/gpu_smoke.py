"""GPU smoke run: the engine on CUDA with NCCL, for every objective, in a few minutes.

    .venv/bin/python -m benchmarks.gpu_smoke [--workers N] [--out DIR]

On a machine with CUDA (a local Ray instance over its GPUs; NCCL between the ranks, bf16):
  1. every registered objective takes a few steps on tiny configs under ZeRO-2 (multi-part
     objectives: ZeRO-2 only, as the engine requires) and, for single-part ones, ZeRO-3;
  2. each run writes a checkpoint, then a second `fit` resumes from it and takes one more step;
  3. the DALL-E run's exported weights sample a few image tokens on the GPU (KV cache).
It prints one line per run (objective, ZeRO stage, steps, loss, resumed step) and a summary.
Without CUDA it says so and exits 0 without running anything: the CPU collective guard in
tests/trainer/test_device_guard.py stands in for it there.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
STEPS = 4  # checkpoint at 2 and 4; the resumed run takes step 5


def tiny_overrides(objective: str, digits: str) -> tuple[str, list[str]]:
    """(config file, overrides): the tiny sizes of each objective, shared with the CPU
    collective guard (tests/trainer/test_device_guard.py)."""
    shards = f"data.path={digits}/train"
    table = {
        "dalle": ("dalle_tiny.yaml", []),
        "ldm": ("ldm_tiny.yaml", []),
        "clip": (
            "clip_digits.yaml",
            [shards, f"clip.model_config={CONFIGS}/clip_digits_tiny.json"],
        ),
        "dvae": ("dvae_digits.yaml", [shards, "dvae.n_hid=16", "dvae.n_init=16"]),
        "vqgan": (
            "vqgan_digits.yaml",
            [
                shards,
                "vqgan.image_size=16",
                "vqgan.ch_mult=[1, 2]",
                "vqgan.n_embed=16",
                "vqgan.z_channels=8",
                "vqgan.embed_dim=4",
                "vqgan_train.disc_ndf=8",
                "vqgan_train.disc_start=0",  # both parts step from the start
                "vqgan_train.dead_code_every=1",  # the restart's collectives run at step 1
            ],
        ),
        "klae": ("klae_digits.yaml", [shards, "klae_train.scale_batches=1"]),
    }
    if objective not in table:
        raise ValueError(f"gpu_smoke: no tiny config for objective {objective!r}; add one here")
    return table[objective]


def run_config(objective: str, zero: int, storage: str, digits: str, workers: int, steps: int):
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig

    name, overrides = tiny_overrides(objective, digits)
    return load_config(
        TrainConfig,
        CONFIGS / name,
        [
            f"name={objective}-z{zero}",
            f"checkpoint.storage_path={storage}",
            f"steps={steps}",
            "log_every=1",
            "checkpoint.every_steps=2",
            "failure_max_retries=0",
            "optimizer.warmup_steps=1",
            "data.batch_size=8",
            f"scaling.num_workers={workers}",
            "scaling.use_gpu=true",
            "engine.precision=bf16",
            f"engine.zero_stage={zero}",
            *overrides,
        ],
    )


def smoke_objective(objective, zero, storage, digits, workers) -> dict:
    from trainer.launch import fit

    t0 = time.perf_counter()
    first = fit(run_config(objective, zero, storage, digits, workers, STEPS))
    if first.error:
        raise RuntimeError(f"{objective} ZeRO-{zero}: {first.error}")
    again = fit(run_config(objective, zero, storage, digits, workers, STEPS + 1))
    if again.error:
        raise RuntimeError(f"{objective} ZeRO-{zero} resume: {again.error}")
    m = again.metrics
    if m["step"] != STEPS + 1:
        raise RuntimeError(f"{objective} ZeRO-{zero}: resumed run ended at step {m['step']}")
    return {
        "objective": objective,
        "zero": zero,
        "loss": m["loss"],
        "step": m["step"],
        "seconds": time.perf_counter() - t0,
        "checkpoint": again.checkpoint.path if again.checkpoint else "",
    }


def sample_dalle(run_dir: str) -> int:
    """A few image tokens from the exported DALL-E on the GPU; returns how many."""
    from data_pipeline.config import StorageConfig
    from trainer.sampling.ar import load_dalle, sample_codes

    model, cfg = load_dalle(run_dir, StorageConfig(), device="cuda")
    text = torch.randint(1, cfg.dalle.text_vocab, (2, cfg.dalle.text_len), device="cuda")
    with torch.no_grad():
        codes = sample_codes(model, text, seeds=[0, 1], top_k=8)
    if codes.shape != (2, model.cfg.image_len) or not codes.is_cuda:
        raise RuntimeError(f"sample: unexpected codes {tuple(codes.shape)} on {codes.device}")
    return int(codes.numel())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=0, help="ranks (default: GPUs, at most 2)")
    p.add_argument("--out", default="", help="storage dir (default: a temp dir)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_smoke: no CUDA device on this machine: nothing run (the CPU collective guard, "
            "tests/trainer/test_device_guard.py, covers device placement here)"
        )
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cuda")
    import ray

    from data_pipeline.digits import DigitsConfig, build_digits
    from trainer.engine import objective_parts
    from trainer.objectives import OBJECTIVES, build_objective

    gpus = torch.cuda.device_count()
    workers = args.workers or min(2, gpus)
    print(
        f"gpu_smoke: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"{workers} ranks (NCCL), bf16",
        flush=True,
    )
    storage = args.out or tempfile.mkdtemp(prefix="t2i-gpu-smoke-")
    digits = os.path.join(storage, "digits")
    build_digits(DigitsConfig(out=digits, photos=0), log=lambda *_: None)
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2 * workers + 2), num_gpus=gpus, include_dashboard=False
    )
    rows, failures = [], []
    for objective in sorted(OBJECTIVES):
        cfg = run_config(objective, 2, storage, digits, workers, STEPS)
        single = len(objective_parts(build_objective(cfg))) == 1  # several parts: ZeRO <= 2
        for zero in (2, 3) if single else (2,):
            try:
                row = smoke_objective(objective, zero, storage, digits, workers)
                rows.append(row)
                print(
                    f"gpu_smoke: {objective:6s} ZeRO-{zero}: steps 1-{STEPS} + resumed to "
                    f"{row['step']}, loss {row['loss']:.4f}, {row['seconds']:.0f}s",
                    flush=True,
                )
            except Exception as e:  # report every objective, then fail
                failures.append(f"{objective} ZeRO-{zero}: {e}")
                print(f"gpu_smoke: {objective:6s} ZeRO-{zero}: FAILED: {e}", flush=True)
    if "dalle" in OBJECTIVES:
        try:
            n = sample_dalle(os.path.join(storage, "dalle-z2"))
            print(f"gpu_smoke: sample: {n} image tokens from the exported DALL-E on cuda")
        except Exception as e:
            failures.append(f"sample: {e}")
            print(f"gpu_smoke: sample: FAILED: {e}")
    print(f"gpu_smoke: {len(rows)} runs ok, {len(failures)} failed; storage {storage}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
