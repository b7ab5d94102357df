"""Training metrics: averaged over the log interval, reported to Ray (dashboard) and TensorBoard."""

from __future__ import annotations

import json
import os
import time

import torch

from data_pipeline import fs
from trainer.checkpoint import TrainState
from trainer.config import TrainConfig


def measure_peak_flops(n: int = 1024, seconds: float = 0.3) -> float:
    """A bf16 matmul rate on this process's threads: the denominator of MFU on CPU."""
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b  # warm-up
    iters, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        iters += 1
    return 2 * n**3 * iters / elapsed


def current_rss_gib() -> float:
    """Resident memory of this process now (Linux /proc), GiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def all_ranks_sum(value: float) -> float:
    """Sum over the data-parallel ranks (a collective: every rank must call it)."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return float(t.item())


def compute_mfu(tokens_per_s_per_worker: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s (fwd+bwd) over the peak of one worker."""
    return tokens_per_s_per_worker * flops_per_token / peak_flops if peak_flops > 0 else 0.0


class MetricsLogger:
    """Collects per-step values; every `log_every` steps returns their averages (the loop reports
    them to Ray on every rank; rank 0's are what Ray shows) and rank 0 writes TensorBoard events."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, objective, peak_flops: float):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.objective, self.peak_flops = objective, peak_flops
        self.sums: dict[str, float] = {}
        self.micro = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.writer = None
        self.rss_before_init = 0.0  # set by the loop before the engine is built
        self.model_state_gib = float("nan")  # RSS growth from engine init through the first step
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tensorboard_dir())

    def tensorboard_dir(self) -> str:
        run = fs.resolve(self.cfg.checkpoint.storage_path).join(self.cfg.name)
        # TensorBoard writes local files; with S3 storage they stay on the rank-0 node.
        return os.path.join(run.path if not run.is_s3 else os.path.abspath("runs"), "tensorboard")

    def accumulate(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], batch) -> None:
        self.micro += 1
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(loss.detach())
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.tokens += self.objective.tokens_in_batch(batch)

    def skipped(self, state: TrainState, why: str) -> None:
        if self.rank == 0:
            print(
                f"[t2i] step {state.step}: skipped ({why}); {state.skipped_steps} so far",
                flush=True,
            )

    def step(self, engine, state: TrainState, *, force: bool = False) -> dict | None:
        """Metrics averaged since the last log step, on log steps (or `force`); else None."""
        if self.model_state_gib != self.model_state_gib:  # first applied step: NaN check
            self.model_state_gib = current_rss_gib() - self.rss_before_init
        if state.step % self.cfg.log_every and state.step < self.cfg.steps and not force:
            return None
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        tok_s = self.tokens / elapsed  # this worker
        out = {k: v / max(self.micro, 1) for k, v in self.sums.items()}
        grad_norm = engine.get_global_grad_norm()
        out.update(
            step=state.step,
            epoch=state.epoch,
            lr=engine.optimizer.param_groups[0]["lr"],
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            tokens_per_s=tok_s * self.world,
            samples_per_s=self.micro * self.cfg.data.batch_size * self.world / elapsed,
            mfu=compute_mfu(tok_s, self.objective.flops_per_token(), self.peak_flops),
            skipped_steps=state.skipped_steps,
            model_state_gib=self.model_state_gib,
            peak_rss_gib=peak_rss_gib(),
            peak_rss_gib_total=all_ranks_sum(peak_rss_gib()),
        )
        if self.writer is not None:
            for k, v in out.items():
                if k not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{k}", v, state.step)
            self.writer.flush()
            with open(os.path.join(self.tensorboard_dir(), "metrics.jsonl"), "a") as f:
                f.write(json.dumps(out) + "\n")  # the same rows, for scripts (no TB reader)
            print("[t2i] " + " ".join(f"{k}={_fmt(v)}" for k, v in out.items()), flush=True)
        self.sums, self.micro, self.tokens, self.t0 = {}, 0, 0, time.perf_counter()
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
