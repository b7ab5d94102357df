"""Training metrics: averaged over the log interval, reported to Ray (dashboard) and TensorBoard."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from data_pipeline import fs
from trainer.checkpoint import TrainState
from trainer.config import TrainConfig


def measure_peak_flops(
    dtype: torch.dtype = torch.bfloat16, n: int = 1024, seconds: float = 0.3
) -> float:
    """A matmul rate in the training dtype on this process's threads: the denominator of MFU
    on CPU."""
    g = torch.Generator().manual_seed(0)  # never the global stream: resume must stay bit-exact
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
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
    """Sum over the data-parallel ranks (a collective: every rank must call it), reduced on the
    process group's device (CUDA under NCCL) by the one helper in trainer/distributed.py."""
    from trainer.distributed import collective_device, dist_sum

    return dist_sum(value, collective_device())


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

    def step(self, engines: dict, state: TrainState, *, force: bool = False) -> dict | None:
        """Metrics averaged since the last log step, on log steps (or `force`); else None.
        `engines` by part: lr and grad norm are the first part's, `lr_<part>` and
        `grad_norm_<part>` the others'."""
        if self.model_state_gib != self.model_state_gib:  # first applied step: NaN check
            self.model_state_gib = current_rss_gib() - self.rss_before_init
        if state.step % self.cfg.log_every and state.step < self.cfg.steps and not force:
            return None
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        tok_s = self.tokens / elapsed  # this worker
        out = {k: v / max(self.micro, 1) for k, v in self.sums.items()}
        (_, engine), *others = engines.items()
        out.update(
            step=state.step,
            epoch=state.epoch,
            lr=engine.optimizer.param_groups[0]["lr"],
            grad_norm=_grad_norm(engine),
            tokens_per_s=tok_s * self.world,
            samples_per_s=self.micro * self.cfg.data.batch_size * self.world / elapsed,
            mfu=compute_mfu(tok_s, self.objective.flops_per_token(), self.peak_flops),
            skipped_steps=state.skipped_steps,
            model_state_gib=self.model_state_gib,
            peak_rss_gib=peak_rss_gib(),
            peak_rss_gib_total=all_ranks_sum(peak_rss_gib()),
        )
        for part, e in others:
            out[f"lr_{part}"] = e.optimizer.param_groups[0]["lr"]
            out[f"grad_norm_{part}"] = _grad_norm(e)
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

    def images_dir(self) -> str:
        """`<run dir>/images`, beside the TensorBoard events."""
        return os.path.join(os.path.dirname(self.tensorboard_dir()), "images")

    def images(self, images: dict[str, np.ndarray], step: int) -> list[str]:
        """Rank 0: write each uint8 (H, W, 3) grid as `images/<name>_step<NNNNNNNN>.png` and to
        TensorBoard. Returns the paths written (none on other ranks)."""
        if self.writer is None:
            return []
        from PIL import Image

        os.makedirs(self.images_dir(), exist_ok=True)
        paths = []
        for name, grid in images.items():
            grid = np.asarray(grid)
            if grid.dtype != np.uint8 or grid.ndim != 3 or grid.shape[2] != 3:
                raise ValueError(
                    f"log_images: image {name!r} must be uint8 (H, W, 3), "
                    f"got {grid.dtype} {grid.shape}"
                )
            path = os.path.join(self.images_dir(), f"{name}_step{step:08d}.png")
            Image.fromarray(grid).save(path)
            self.writer.add_image(f"images/{name}", grid, step, dataformats="HWC")
            paths.append(path)
        self.writer.flush()
        return paths

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()  # of the last applied step
    return float(norm) if norm is not None else float("nan")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
