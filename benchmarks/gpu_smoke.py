"""GPU smoke run: the engine on CUDA with NCCL, for every objective, in a few minutes.

    .venv/bin/python -m benchmarks.gpu_smoke [--workers N] [--out DIR] [--precisions bf16,fp16]

On a machine with CUDA (a local Ray instance over its GPUs; NCCL between the ranks), through the
project's own entry (`trainer.launch.fit`, the loop every `t2i train` runs; no second loop here):
  1. every registered objective (clip included) takes a few steps on tiny configs under ZeRO-2 in
     each precision asked for (bf16, fp16), writes a checkpoint, and a second `fit` resumes from it
     and takes one more step; single-part objectives also run ZeRO-3 (bf16);
  2. ZeRO-3 with the optimizer offloaded to CPU memory (pinned) on the DALL-E and U-Net configs;
  3. exact resume: the DALL-E run (bf16, ZeRO-2) interrupted at step 4 and resumed to 5 ends with
     the same weights, bit for bit, as an uninterrupted run to 5 (a second uninterrupted run
     tells a resume bug from nondeterministic GPU kernels: if the two uninterrupted runs already
     differ, the comparison is reported as not decidable instead of failing);
  4. the DALL-E run's exported weights sample a few image tokens on the GPU (KV cache).
It prints one line per run and, when everything passed, `gpu_smoke_ok=1` as its last line.
Without CUDA it refuses (exit status 2, nothing run): the CPU device guard
(tests/trainer/test_device_guard.py) stands in for it there.
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


def run_config(
    objective: str,
    zero: int,
    storage: str,
    digits: str,
    workers: int,
    steps: int,
    precision: str = "bf16",
    extra: tuple[str, ...] = (),
    name: str = "",
):
    from data_pipeline.config import load_config
    from trainer.config import TrainConfig

    config, overrides = tiny_overrides(objective, digits)
    return load_config(
        TrainConfig,
        CONFIGS / config,
        [
            f"name={name or f'{objective}-z{zero}-{precision}'}",
            f"checkpoint.storage_path={storage}",
            f"steps={steps}",
            "log_every=1",
            "checkpoint.every_steps=2",
            "failure_max_retries=0",
            "optimizer.warmup_steps=1",
            "data.batch_size=8",
            f"scaling.num_workers={workers}",
            "scaling.use_gpu=true",
            f"engine.precision={precision}",
            f"engine.zero_stage={zero}",
            *overrides,
            *extra,
        ],
    )


def smoke_objective(objective, zero, storage, digits, workers, precision="bf16", extra=(),
                    tag="") -> dict:  # fmt: skip
    """`fit` to STEPS (checkpoints at 2 and 4), then a second `fit` resumed to STEPS + 1."""
    from trainer.launch import fit

    name = f"{objective}-z{zero}-{precision}{tag}"
    t0 = time.perf_counter()
    what = f"{objective} ZeRO-{zero} {precision}{tag}"
    first = fit(run_config(objective, zero, storage, digits, workers, STEPS, precision, extra, name))
    if first.error:
        raise RuntimeError(f"{what}: {first.error}")
    again = fit(
        run_config(objective, zero, storage, digits, workers, STEPS + 1, precision, extra, name)
    )
    if again.error:
        raise RuntimeError(f"{what} resume: {again.error}")
    m = again.metrics
    if m["step"] != STEPS + 1:
        raise RuntimeError(f"{what}: resumed run ended at step {m['step']}")
    return {
        "objective": objective,
        "zero": zero,
        "what": what,
        "loss": m["loss"],
        "step": m["step"],
        "seconds": time.perf_counter() - t0,
        "checkpoint": again.checkpoint.path if again.checkpoint else "",
    }


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    """The exported weights (model.safetensors) of the newest checkpoint under `run_dir`."""
    from safetensors.torch import load_file

    files = sorted(Path(run_dir).glob("checkpoints/step_*/model.safetensors"))
    if not files:
        raise RuntimeError(f"{run_dir}: no exported model.safetensors")
    return load_file(str(files[-1]))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """0.0 when every tensor is bitwise equal; else the largest absolute difference."""
    if a.keys() != b.keys():
        return float("inf")
    worst = 0.0
    for k in a:
        if not torch.equal(a[k], b[k]):
            worst = max(worst, (a[k].double() - b[k].double()).abs().max().item(), 1e-300)
    return worst


def exact_resume(storage: str, digits: str, workers: int) -> str:
    """Interrupted-and-resumed vs uninterrupted DALL-E run (bf16, ZeRO-2, dropout on, so the
    device generators matter): the final weights must be bit-identical."""
    from trainer.launch import fit

    extra = ("dalle.dropout=0.1",)
    resumed = smoke_objective("dalle", 2, storage, digits, workers, "bf16", extra, "-exact")
    runs = []
    for i in (1, 2):
        name = f"dalle-exact-straight{i}"
        cfg = run_config("dalle", 2, storage, digits, workers, STEPS + 1, "bf16", extra, name)
        r = fit(cfg)
        if r.error:
            raise RuntimeError(f"exact resume, uninterrupted run {i}: {r.error}")
        runs.append(final_weights(os.path.join(storage, name)))
    noise = max_difference(runs[0], runs[1])
    diff = max_difference(final_weights(os.path.join(storage, "dalle-z2-bf16-exact")), runs[0])
    if noise:
        return f"not decidable: two uninterrupted runs differ by {noise:.3g} (kernels)"
    if diff:
        raise RuntimeError(f"exact resume: resumed weights differ by {diff:.3g}")
    return f"bit-identical ({len(runs[0])} tensors, resumed at step {resumed['step'] - 1})"


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=0, help="ranks (default: GPUs, at most 2)")
    p.add_argument("--out", default="", help="storage dir (default: a temp dir)")
    p.add_argument(
        "--precisions", default="bf16,fp16", help="comma-separated: bf16, fp16 (ZeRO-2 runs)"
    )
    args = p.parse_args(argv)
    args.precisions = [x for x in args.precisions.split(",") if x]
    bad = set(args.precisions) - {"bf16", "fp16"}
    if bad or not args.precisions:
        p.error(f"--precisions: bf16 and/or fp16, got {sorted(bad) or 'nothing'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_smoke: refused: no CUDA device on this machine, nothing run (the CPU device "
            "guard, tests/trainer/test_device_guard.py, covers device placement here)"
        )
        return 2
    import ray

    from data_pipeline.digits import DigitsConfig, build_digits
    from trainer.engine import objective_parts
    from trainer.objectives import OBJECTIVES, build_objective

    gpus = torch.cuda.device_count()
    workers = args.workers or min(2, gpus)
    print(
        f"gpu_smoke: {gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
        f"{workers} ranks (NCCL), precisions {args.precisions}",
        flush=True,
    )
    storage = args.out or tempfile.mkdtemp(prefix="t2i-gpu-smoke-")
    digits = os.path.join(storage, "digits")
    build_digits(DigitsConfig(out=digits, photos=0), log=lambda *_: None)
    # cuBLAS's deterministic workspace (the workers inherit it): the exact-resume check compares
    # bits, and cuBLAS otherwise picks reduction orders per call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ray.init(
        num_cpus=max(os.cpu_count() or 1, 2 * workers + 2), num_gpus=gpus, include_dashboard=False
    )
    plan: list[tuple] = []  # (objective, zero, precision, extra overrides, tag)
    for objective in sorted(OBJECTIVES):
        cfg = run_config(objective, 2, storage, digits, workers, STEPS)
        single = len(objective_parts(build_objective(cfg))) == 1  # several parts: ZeRO <= 2
        plan += [(objective, 2, p, (), "") for p in args.precisions]
        if single:
            plan.append((objective, 3, "bf16", (), ""))
    for objective in ("dalle", "ldm"):  # ZeRO-3 with the optimizer in pinned CPU memory
        if objective in OBJECTIVES:
            plan.append((objective, 3, "bf16", ("engine.offload_optimizer=cpu",), "-offload"))
    rows, failures = [], []
    for objective, zero, precision, extra, tag in plan:
        try:
            row = smoke_objective(objective, zero, storage, digits, workers, precision, extra, tag)
            rows.append(row)
            print(
                f"gpu_smoke: {row['what']:28s}: steps 1-{STEPS} + resumed to {row['step']}, "
                f"loss {row['loss']:.4f}, {row['seconds']:.0f}s",
                flush=True,
            )
        except Exception as e:  # report every run, then fail
            failures.append(f"{objective} ZeRO-{zero} {precision}{tag}: {e}")
            print(f"gpu_smoke: {objective} ZeRO-{zero} {precision}{tag}: FAILED: {e}", flush=True)
    checks = {
        "exact resume": lambda: exact_resume(storage, digits, workers),
        "sample": lambda: f"{sample_dalle(os.path.join(storage, f'dalle-z2-{args.precisions[0]}'))}"
        " image tokens from the exported DALL-E on cuda",
    }
    for name, check in checks.items():
        try:
            print(f"gpu_smoke: {name}: {check()}", flush=True)
        except Exception as e:
            failures.append(f"{name}: {e}")
            print(f"gpu_smoke: {name}: FAILED: {e}", flush=True)
    print(f"gpu_smoke: {len(rows)} runs ok, {len(failures)} failed; storage {storage}")
    if failures:
        return 1
    print("gpu_smoke_ok=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
