"""Training metrics: averaged over the log interval, reported to Ray Train, exported to the Ray
dashboard's Metrics view (`ray.util.metrics`, data_pipeline/ray_metrics.py), and written by rank 0
to the run's own directory in its storage:

    <storage_path>/<name>/tensorboard/events.out.tfevents.*   TensorBoard (one run per directory)
    <storage_path>/<name>/tensorboard/metrics.jsonl           the same rows, one JSON per log step
    <storage_path>/<name>/tensorboard/loss_curve.png          loss vs step, drawn from metrics.jsonl
    <storage_path>/<name>/images/<name>_step<N>.png           objective image grids

With local storage rank 0 writes there directly. With s3:// it writes to a local staging
directory and uploads what changed after every checkpoint and at the end, so TensorBoard files
travel with the checkpoints; a restarted run continues the stored metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from data_pipeline import fs
from data_pipeline.ray_metrics import TRAIN, TRAIN_KEYS, TRAIN_TAGS, MetricSet
from trainer.checkpoint import TrainState
from trainer.config import TrainConfig
from trainer.engine import DTYPES, engine_state_bytes

MONITOR_DIRS = ("tensorboard", "images")  # what rank 0 writes under the run directory
LOSS_CURVE = "loss_curve.png"


def measure_peak_flops(
    dtype: torch.dtype = torch.bfloat16,
    n: int = 1024,
    seconds: float = 0.3,
    device: torch.device | str = "cpu",
) -> float:
    """A matmul rate in the training dtype on `device` (on the CPU: this process's threads): the
    denominator of MFU where no datasheet peak is known (`peak_flops`)."""
    device = torch.device(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    g = torch.Generator().manual_seed(0)  # never the global stream: resume must stay bit-exact
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    a @ b  # warm-up
    sync()
    iters, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        a @ b
        iters += 1
        if cuda and iters % 8:
            continue  # a GPU queues the matmuls: time whole batches of 8
        sync()
    sync()
    elapsed = time.perf_counter() - t0
    return 2 * n**3 * iters / elapsed


# Dense tensor-core peaks in TFLOP/s from NVIDIA's datasheets (their headline figures with
# sparsity halved), by the precision the matmuls run in. Matched against the device name that
# torch reports (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"), first match wins.
# A10G (AWS g5): NVIDIA publishes no datasheet; these are the A10's figures.
GPU_PEAK_TFLOPS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    (("H100", "NVL"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H100", "PCIE"), {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (("H100",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (("H200", "NVL"), {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (("H200",), {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),  # SXM and PCIe
    (("A10G",), {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (("L4",), {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


def gpu_peak_flops(device_name: str, precision: str) -> float:
    """The datasheet peak (FLOP/s) of the GPU named `device_name` for matmuls in `precision`
    ("bf16", "fp16", "tf32", "fp32"); 0.0 for a GPU not in `GPU_PEAK_TFLOPS`."""
    words = device_name.upper().replace("-", " ").split()
    for keys, peaks in GPU_PEAK_TFLOPS:
        if all(k in words for k in keys):  # whole words: "L4" is not "L40S"
            return peaks[precision] * 1e12
    return 0.0


def matmul_precision(precision: str) -> str:
    """What an fp32 run's matmuls run in on a GPU: TF32 tensor cores unless torch is told to
    keep full fp32 (`torch.set_float32_matmul_precision("highest")`)."""
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return precision


def peak_flops(device: torch.device, precision: str) -> float:
    """Peak FLOP/s of one worker in the run's `precision` (bf16/fp16/fp32), the MFU denominator:
    a GPU's datasheet figure (`gpu_peak_flops`), else a matmul probe on `device` itself (never a
    CPU probe for a GPU run: it would read MFU > 1)."""
    if device.type == "cuda":
        peak = gpu_peak_flops(torch.cuda.get_device_name(device), matmul_precision(precision))
        if peak:
            return peak
        return measure_peak_flops(DTYPES[precision], n=4096, seconds=0.5, device=device)
    return measure_peak_flops(DTYPES[precision])


def gpu_memory_gib(device: torch.device) -> dict[str, float]:
    """The CUDA caching allocator's view of `device`: memory held by tensors now, reserved by
    the allocator now, and the peak held by tensors since the run (re)started; {} off CUDA."""
    if device.type != "cuda":
        return {}
    return {
        "gpu_mem_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
        "gpu_mem_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
        "gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


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

    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world: int,
        objective,
        peak_flops: float,
        device: torch.device | str = "cpu",
    ):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.objective, self.peak_flops = objective, peak_flops
        self.device = torch.device(device)  # the engine's: metrics accumulate there
        # Running sums since the last log step: tensors stay on the device where the loss was
        # computed (no host sync per micro-step); read once, together, at the log step.
        self.sums: dict[str, torch.Tensor | float] = {}
        self.micro = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.paused = 0.0  # checkpoint and image-logging seconds in the interval (not training)
        self.steps = 0  # optimizer steps in the current interval
        self.checkpoint_s = float("nan")  # wall seconds of the last checkpoint
        self.writer = None
        self.rss_before_init = 0.0  # set by the loop before the engine is built
        self.model_state_gib = float("nan")  # engine-held model state after the first step
        self.model_state_rss_gib = float("nan")  # RSS growth from engine init to the first step
        self.run = fs.resolve(cfg.checkpoint.storage_path, storage=cfg.storage).join(cfg.name)
        self.root = run_monitor_root(self.run)  # where rank 0 writes; == the run dir if local
        self._synced: dict[str, tuple[int, int]] = {}  # relpath -> (size, mtime_ns) uploaded
        self.export = MetricSet(TRAIN, TRAIN_TAGS)  # the dashboard's Metrics view (rank 0)
        self.tags = {"run": cfg.name, "objective": cfg.objective}
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            if self.run.is_s3:
                stage_from_storage(self.run, self.root)
            self.writer = SummaryWriter(self.tensorboard_dir())

    def tensorboard_dir(self) -> str:
        """The local directory TensorBoard events and metrics.jsonl are written to: the run's
        `tensorboard/` itself (local storage) or its staging copy (S3)."""
        return os.path.join(self.root, "tensorboard")

    def accumulate(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], batch) -> None:
        """Add one micro-batch's loss and metrics to the interval's sums, where they are: a tensor
        is added on its device without reading it (a GPU run would otherwise wait for the GPU at
        every metric of every micro-step); Python numbers stay numbers."""
        self.micro += 1
        for k, v in (("loss", loss), *metrics.items()):
            v = v.detach().float().reshape(()) if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        self.tokens += self.objective.tokens_in_batch(batch)

    def read_sums(self) -> dict[str, float]:
        """The interval's sums as Python floats: one device-to-host copy per device."""
        out = {k: v for k, v in self.sums.items() if not isinstance(v, torch.Tensor)}
        by_device: dict[torch.device, list[str]] = {}
        for k, v in self.sums.items():
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(k)
        for keys in by_device.values():
            values = torch.stack([self.sums[k] for k in keys]).tolist()
            out.update(zip(keys, values, strict=True))
        return {k: out[k] for k in self.sums}

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
            self.model_state_gib = sum(engine_state_bytes(e) for e in engines.values()) / 2**30
            self.model_state_rss_gib = current_rss_gib() - self.rss_before_init
        self.steps += 1
        if state.step % self.cfg.log_every and state.step < self.cfg.steps and not force:
            return None
        # Training time only: checkpoint seconds in the interval are measured apart.
        elapsed = max(time.perf_counter() - self.t0 - self.paused, 1e-9)
        tok_s = self.tokens / elapsed  # this worker
        out = {k: v / max(self.micro, 1) for k, v in self.read_sums().items()}
        (_, engine), *others = engines.items()
        out.update(
            step=state.step,
            epoch=state.epoch,
            lr=engine.optimizer.param_groups[0]["lr"],
            grad_norm=_grad_norm(engine),
            tokens_per_s=tok_s * self.world,
            samples_per_s=self.micro * self.cfg.data.batch_size * self.world / elapsed,
            step_time_s=elapsed / self.steps,
            mfu=compute_mfu(tok_s, self.objective.flops_per_token(), self.peak_flops),
            skipped_steps=state.skipped_steps,
            model_state_gib=self.model_state_gib,
            model_state_rss_gib=self.model_state_rss_gib,
            peak_rss_gib=peak_rss_gib(),
            peak_rss_gib_total=all_ranks_sum(peak_rss_gib()),
            **gpu_memory_gib(self.device),  # beside RSS, on GPU ranks
        )
        if self.checkpoint_s == self.checkpoint_s:  # one was saved since the run (re)started
            out["checkpoint_s"] = self.checkpoint_s
        for part, e in others:
            out[f"lr_{part}"] = e.optimizer.param_groups[0]["lr"]
            out[f"grad_norm_{part}"] = _grad_norm(e)
        if self.writer is not None:
            for k, v in out.items():
                if k not in ("step", "epoch", "checkpoint_s"):  # checkpoint_s: at its own step
                    self.writer.add_scalar(f"train/{k}", v, state.step)
            self.writer.flush()
            with open(os.path.join(self.tensorboard_dir(), "metrics.jsonl"), "a") as f:
                f.write(json.dumps(out) + "\n")  # the same rows, for scripts (no TB reader)
            print("[t2i] " + " ".join(f"{k}={_fmt(v)}" for k, v in out.items()), flush=True)
            self.export.record({m: out.get(k) for m, k in TRAIN_KEYS.items()}, self.tags)
        self.sums, self.micro, self.tokens, self.t0 = {}, 0, 0, time.perf_counter()
        self.paused, self.steps = 0.0, 0
        return out

    @contextlib.contextmanager
    def apart(self):
        """Time a block (image logging) out of the interval's training throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused += time.perf_counter() - t0

    @contextlib.contextmanager
    def checkpointing(self, step: int):
        """Wrap a checkpoint save (every rank): its wall seconds become `checkpoint_s` (Ray
        dashboard gauge now, TensorBoard and the next metrics row) and leave the throughput of
        the interval; then rank 0 draws the loss curve and copies its monitoring files to the
        run's storage (S3), so they are stored with every checkpoint."""
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self.paused += seconds
        self.checkpoint_s = seconds
        if self.writer is None:
            return
        self.writer.add_scalar("train/checkpoint_s", seconds, step)
        self.export.record({"t2i_train_checkpoint_seconds": seconds}, self.tags)
        self.publish()

    def publish(self) -> None:
        """Rank 0: redraw `loss_curve.png` from metrics.jsonl and, with S3 storage, upload the
        monitoring files that changed since the last upload."""
        if self.writer is None:
            return
        self.writer.flush()
        jsonl = os.path.join(self.tensorboard_dir(), "metrics.jsonl")
        if os.path.exists(jsonl):
            with open(os.path.join(self.tensorboard_dir(), LOSS_CURVE), "wb") as f:
                f.write(plot_loss_curve(read_metrics_rows(jsonl), title=self.cfg.name))
        if self.run.is_s3:
            self._synced = upload_changed(self.root, self.run, self._synced)

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
            self.publish()
            self.writer = None


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()  # of the last applied step
    return float(norm) if norm is not None else float("nan")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def run_monitor_root(run: fs.Location) -> str:
    """The local directory rank 0 writes `tensorboard/` and `images/` into: the run directory
    itself for local storage; for S3, a staging directory on this node named by the run's URI
    (one run per directory there too), uploaded by `upload_changed`."""
    if not run.is_s3:
        return run.path
    key = hashlib.sha256(run.uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "t2i-monitor", key)


def stage_from_storage(run: fs.Location, root: str) -> None:
    """S3: start a clean staging directory that continues the stored metrics.jsonl (a restarted
    run appends after the rows its last checkpoint uploaded). Event files already in storage stay
    there; TensorBoard reads the old and the new ones of the directory as one run."""
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(root, "tensorboard"))
    stored = run.join("tensorboard", "metrics.jsonl")
    if fs.exists(stored):
        with open(os.path.join(root, "tensorboard", "metrics.jsonl"), "wb") as f:
            f.write(fs.read_bytes(stored))


def upload_changed(
    root: str, run: fs.Location, synced: dict[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """Copy the files under `root`/{tensorboard,images} whose size or mtime changed since `synced`
    to the same relative paths under `run`; returns the new `synced`."""
    out = dict(synced)
    for sub in MONITOR_DIRS:
        base = os.path.join(root, sub)
        if not os.path.isdir(base):
            continue
        for dirpath, _, names in os.walk(base):
            for n in sorted(names):
                path = os.path.join(dirpath, n)
                rel = os.path.relpath(path, root)
                st = os.stat(path)
                if out.get(rel) == (st.st_size, st.st_mtime_ns):
                    continue
                with open(path, "rb") as f:
                    fs.write_bytes_atomic(run.join(*rel.split(os.sep)), f.read())
                out[rel] = (st.st_size, st.st_mtime_ns)
    return out


def read_metrics_rows(path: str) -> list[dict]:
    """metrics.jsonl rows, the last one per step (a resumed run logs some steps again)."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(rows: list[dict], title: str = "") -> bytes:
    """PNG bytes of `loss` (and every `loss_<part>`) against the step: matplotlib, Agg backend."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    keys = ["loss"] + sorted({k for r in rows for k in r if k.startswith("loss_")})
    for k in keys:
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] == r[k]]  # NaN: skipped step
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 50 else None, label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the log interval)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
