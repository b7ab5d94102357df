"""Training engine benchmark: every figure measured side by side in this one run.

    .venv/bin/python -m benchmarks.train            # ~15-25 min on 2 cores (the 1.3B part dominates)
    .venv/bin/python -m benchmarks.train --skip-1b  # the rest, ~6 min

1. overhead: Ray Train + DeepSpeed (1 worker, all cores, ZeRO-0, `engine.autocast=true`) step
   time vs a bare single-process PyTorch loop doing the same math on the same 151M DALL-E and
   batch: fp32 weights and Adam state, forward + loss under autocast, fused AdamW (goal <= 1.10).
   Also printed: the bare loop with torch's default AdamW, the old bf16-weights loop, and the
   engine in DeepSpeed's bf16 mode under ZeRO-1. Precision `auto`: bf16 on AVX512-BF16/AMX
   CPUs, fp32 on others. The machine's speed drifts (shared cores), so both sides are timed in
   windows of `--steps` steps (the bare loop before Ray starts and after the engine ran, the
   engine in its log windows after the start-up one) and each side's figure is its median.
2. MFU of the engine run vs the matmul peak in that dtype measured here (goal >= 0.5).
3. ZeRO-3 model state per worker at 2 workers / 1 worker (goal <= 0.55): the bytes of the
   tensors DeepSpeed holds (parameter partitions, gradients, fp32 master partitions, Adam
   moments, buffers; `trainer.engine.engine_state_bytes`); RSS growth printed beside it.
4. The 1.3B preset on 2 workers inside this machine: ZeRO-3 + optimizer state offloaded to disk
   (ZeRO-Infinity); optimizer steps taken?, peak RSS, step time.
5. The paper's sparse pattern (row/col/conv, computed blockwise) vs the same pattern through
   dense (L, L) masks, on the peer config at a 32x32 grid (L = 64 + 1024), a plain loop (fp32
   weights and AdamW, autocast to the engine's dtype), each figure from a fresh process:
   training tokens/s ratio (goal >= 1.0) and the ratio of a training step's peak memory above
   the memory it starts from (weights, Adam state: identical in both) (goal <= 0.7); the
   activations saved for backward and the whole processes' peak RSS are printed beside it.
6. Cached sampling on the peer config: image tokens/s of one candidate (prefill + 255 decode
   steps, multinomial sampling) in the engine's dtype; batched candidates printed too.

    .venv/bin/python -m benchmarks.train --only-sparse  # parts 5 and 6 alone

The last line printed is exactly:
overhead_ratio=<f> mfu=<f> zero3_mem_ratio=<f> sparse_vs_dense=<f> sparse_mem_ratio=<f> \
sample_tok_s=<f> b1_steps_ok=<0|1> b1_params=<int> b1_peak_rss_gib=<f>
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import statistics
import tempfile
import time

import torch

from benchmarks.common import fit_logged, offload_overrides, offloaded_run
from data_pipeline.config import RayConfig, load_config
from jobs.common import init_ray
from trainer.config import DalleTrainSection, TrainConfig
from trainer.engine import DTYPES, resolve_precision
from trainer.launch import fit, worker_env
from trainer.metrics import current_rss_gib, measure_peak_flops
from trainer.models.dalle import DalleTransformer, compute_dalle_loss, dalle_preset

# The peer config from DESIGN.md (lucidrains' DALLE-pytorch measured on this machine).
PEER = dict(dim=768, depth=12, heads=12, head_dim=64, text_len=64, image_grid=16,
            image_vocab=8192, text_vocab=16384, attn_pattern="dalle", conv_kernel=11)  # fmt: skip
BATCH = 4
PRECISION = resolve_precision("auto")  # what the engine runs in by default on this machine


def engine_cfg(name: str, storage: str, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        None,
        [
            f"name={name}",
            f"checkpoint.storage_path={storage}",
            "checkpoint.every_steps=0",
            "checkpoint.export_weights=false",
            "failure_max_retries=0",
            "data.source=synthetic",
            *overrides,
        ],
    )


def peer_overrides() -> list[str]:
    return [f"dalle.{k}={v}" for k, v in PEER.items()]


BARE_LOOPS = {  # name -> (weights dtype is PRECISION, autocast, fused AdamW)
    "bf16-weights": (True, False, False),  # the old baseline: no fp32 master copy
    "autocast": (False, True, False),  # a plain PyTorch AMP loop, default AdamW
    "autocast+fused": (False, True, True),  # the same, with the engine's fused AdamW
}


def bare_loop(kind: str):
    """The loop a user writes without Ray or DeepSpeed, one process, the engine's loss and
    clipping. kind (BARE_LOOPS): "bf16-weights" keeps the weights and Adam state in PRECISION;
    the "autocast" loops keep fp32 weights (the master copy) and fp32 Adam state and run the
    forward + loss under autocast to PRECISION, the same math as the engine.
    Returns `window(steps) -> tokens/s` over that many steps of the same loop."""
    low_weights, amp, fused = BARE_LOOPS[kind]
    torch.manual_seed(0)
    cfg, weights = dalle_preset("tiny", **PEER), DalleTrainSection()  # the engine's defaults
    model = DalleTransformer(cfg)
    if low_weights:
        model = model.to(DTYPES[PRECISION])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    text = torch.randint(1, cfg.text_vocab, (BATCH, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (BATCH, cfg.image_len))
    amp_on = amp and PRECISION != "fp32"

    def step() -> None:
        with torch.autocast("cpu", dtype=DTYPES[PRECISION], enabled=amp_on):
            tl, il = model(text, image)
            loss, _ = compute_dalle_loss(
                tl,
                il,
                model.internal_text(text),
                image,
                weights.text_loss_weight,
                weights.image_loss_weight,
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def window(steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return steps * BATCH * cfg.seq_len / (time.perf_counter() - t0)

    return window


def _fmt(rates: list[float]) -> str:
    return "[" + ", ".join(f"{r:.0f}" for r in rates) + "] tokens/s"


SPARSE_GRID = 32  # parts 5-6: the paper's grid, where sparsity matters (the peer uses 16)


def _fixed_mmap_threshold() -> None:
    """glibc: serve every allocation >= 64 KiB by mmap and return it on free, so resident memory
    follows the live tensors (the default threshold adapts upwards and keeps freed blocks)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops the adaptation)
    libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD


def _attention_run(shape: dict, batch: int, steps: int, warmup: int, memory: bool, out) -> None:
    """Child process of `sparse_vs_dense`: trains DalleConfig fields `shape` in a plain loop
    (fp32 weights and AdamW, autocast to PRECISION). Puts on queue `out` (tokens/s, peak RSS
    GiB, GiB saved for backward, GiB of the step's peak above the memory it starts from).
    memory=True: resident memory follows the live tensors (timings are not comparable then)."""
    if memory:
        _fixed_mmap_threshold()
    torch.set_num_threads(os.cpu_count() or 2)
    torch.manual_seed(0)
    cfg = dalle_preset("tiny", **shape)
    model = DalleTransformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    text = torch.randint(1, cfg.text_vocab, (batch, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (batch, cfg.image_len))
    low = PRECISION != "fp32"
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes of what autograd keeps for backward

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    t0, most, start = 0.0, 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            t0 = time.perf_counter()
        # Model, grads (None) and Adam state as the step starts (after the first step's
        # optimizer allocated its moments, the later steps all start alike).
        start = current_rss_gib()
        saved.clear()  # all alive until backward: no address is reused within one forward
        with (
            torch.autocast("cpu", dtype=DTYPES[PRECISION], enabled=low),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            tl, il = model(text, image)
            loss, _ = compute_dalle_loss(tl, il, model.internal_text(text), image)
        most = max(most, sum(saved.values()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tok_s = steps * batch * cfg.seq_len / (time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Every step peaks alike and the first one started lowest (no Adam state yet), so the
    # lifetime peak is a later step's: minus where that step started = the step's own peak.
    out.put((tok_s, peak, most / 2**30, peak - start))


def _child(shape: dict, batch: int, steps: int, memory: bool) -> tuple:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_attention_run, args=(shape, batch, steps, 1, memory, q))
    p.start()
    res = q.get()
    p.join()
    return res


def sparse_vs_dense(batch: int, steps: int) -> tuple[float, float]:
    """(sparse/dense training tokens/s, sparse/dense peak memory of a training step) on the peer
    config at a 32x32 grid with the paper's layer schedule; dense = the same masks as (L, L)
    tensors. Each figure from a fresh process; speed and memory from separate ones."""
    res, mem = {}, {}
    for impl in ("sparse", "matmul"):
        shape = {**PEER, "image_grid": SPARSE_GRID, "attn_impl": impl}
        res[impl] = _child(shape, batch, steps, memory=False)
        mem[impl] = _child(shape, batch, 1, memory=True)
        print(
            f"{'sparse' if impl == 'sparse' else 'dense-mask'} attention, peer config at "
            f"{SPARSE_GRID}x{SPARSE_GRID}, batch {batch}, {PRECISION}: {res[impl][0]:.0f} "
            f"tokens/s; peak of a training step {mem[impl][3]:.2f} GiB above the "
            f"{mem[impl][1] - mem[impl][3]:.2f} GiB it starts from (weights, Adam state); "
            f"activations saved for backward {mem[impl][2]:.2f} GiB; process peak RSS "
            f"{res[impl][1]:.2f} GiB",
            flush=True,
        )
    print(
        f"sparse / dense: activations saved for backward "
        f"{mem['sparse'][2] / mem['matmul'][2]:.3f}, process peak RSS "
        f"{res['sparse'][1] / res['matmul'][1]:.3f}",
        flush=True,
    )
    return res["sparse"][0] / res["matmul"][0], mem["sparse"][3] / mem["matmul"][3]


@torch.no_grad()
def sample_tokens_per_s(batch: int) -> float:
    """Image tokens/s (all candidates) of cached sampling on the peer config in PRECISION."""
    torch.manual_seed(0)
    model = DalleTransformer(dalle_preset("tiny", **PEER)).to(DTYPES[PRECISION]).eval()
    text = torch.randint(1, model.cfg.text_vocab, (batch, model.cfg.text_len))
    t0 = time.perf_counter()
    cache, logits = model.prefill(text)
    for j in range(model.cfg.image_len):
        code = torch.multinomial(logits.float().softmax(-1), 1)[:, 0]  # (B,)
        if j < model.cfg.image_len - 1:
            logits = model.decode_step(code, cache)
    return batch * model.cfg.image_len / (time.perf_counter() - t0)


def sparse_and_sampling(batch: int, steps: int) -> tuple[float, float, float]:
    """Parts 5 and 6: (sparse_vs_dense, sparse_mem_ratio, sample_tok_s)."""
    speed, mem = sparse_vs_dense(batch, steps)
    print(
        f"sparse vs dense masks: tokens/s ratio {speed:.3f}, training-step peak memory ratio "
        f"{mem:.3f}",
        flush=True,
    )
    tok_s = sample_tokens_per_s(1)
    many = sample_tokens_per_s(8)
    print(
        f"cached sampling, peer config, {PRECISION}: {tok_s:.1f} image tokens/s (1 candidate), "
        f"{many:.1f} (8 candidates batched)",
        flush=True,
    )
    return speed, mem, tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed window (parts 1-2)")
    ap.add_argument("--skip-1b", action="store_true", help="skip the 1.3B ZeRO-Infinity run")
    ap.add_argument("--nvme-path", default=os.path.join(tempfile.gettempdir(), "t2i-nvme"))
    ap.add_argument("--only-sparse", action="store_true", help="run parts 5 and 6 only")
    ap.add_argument("--sparse-batch", type=int, default=BATCH, help="batch of part 5")
    ap.add_argument("--sparse-steps", type=int, default=2, help="timed steps of part 5")
    args = ap.parse_args()
    if args.only_sparse:
        torch.set_num_threads(os.cpu_count() or 2)
        speed, mem, tok_s = sparse_and_sampling(args.sparse_batch, args.sparse_steps)
        print(f"sparse_vs_dense={speed:.4f} sparse_mem_ratio={mem:.4f} sample_tok_s={tok_s:.2f}")
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    storage = tempfile.mkdtemp(prefix="t2i-bench-")
    cores = os.cpu_count() or 2
    torch.set_num_threads(cores)

    peak = measure_peak_flops(DTYPES[PRECISION], seconds=1.0)
    print(
        f"{PRECISION} matmul peak, {torch.get_num_threads()} threads: {peak / 1e9:.0f} GFLOP/s",
        flush=True,
    )

    # This machine's speed drifts (shared cores): the equivalent bare loop runs windows of
    # `steps` steps before Ray starts and after the engine runs (Ray still up, as the engine
    # saw it), the engine logs the same windows, and each side's median window is its figure.
    rates = {}
    for kind in BARE_LOOPS:  # the other two once each (one model alive at a time)
        w = bare_loop(kind)
        w(2)  # warm-up
        rates[kind] = [w(args.steps) for _ in range(3 if kind == "autocast+fused" else 1)]
    bare_window = w  # "autocast+fused", the last: timed again after the engine

    init_ray(RayConfig(num_cpus=cores + 2, dashboard=False), runtime_env={"env_vars": worker_env()})
    flops_per_token = DalleTransformer(dalle_preset("tiny", **PEER)).flops_per_token()

    def engine_rates(name: str, *overrides: str) -> list[float]:
        # One worker owning all cores; a start-up log window, then 3 timed windows of
        # `args.steps` steps.
        steps = 4 * args.steps
        rows = fit_logged(
            engine_cfg(
                name,
                storage,
                *peer_overrides(),
                "scaling.num_workers=1",
                f"scaling.cpus_per_worker={cores}",
                f"data.batch_size={BATCH}",
                f"steps={steps}",
                f"log_every={args.steps}",
                f"data.synthetic_samples={steps * BATCH}",
                f"peak_tflops={peak / 1e12}",
                *overrides,
            )
        )
        return [r["tokens_per_s"] for r in rows[1:]]

    # The engine configuration for one worker: nothing to partition (ZeRO-0), fp32 weights and
    # autocast, i.e. the bare "autocast+fused" loop's math inside Ray Train + DeepSpeed.
    engine_windows = engine_rates("overhead", "engine.zero_stage=0", "engine.autocast=true")
    # DeepSpeed's own bf16 mode (bf16 weights, fp32 master copies) under ZeRO-1, for comparison.
    engine_z1 = statistics.median(engine_rates("overhead-z1", "engine.zero_stage=1"))
    rates["autocast+fused"] += [bare_window(args.steps) for _ in range(3)]
    del bare_window, w
    bare = {kind: statistics.median(r) for kind, r in rates.items()}
    for kind, r in rates.items():
        print(
            f"bare PyTorch loop (151M, {PRECISION}, batch {BATCH}, {kind}): {bare[kind]:.0f} "
            f"tokens/s (median of {_fmt(r)})",
            flush=True,
        )
    engine = statistics.median(engine_windows)
    mfu = engine * flops_per_token / peak
    overhead = bare["autocast+fused"] / engine
    print(
        f"Ray Train + DeepSpeed (1 worker, ZeRO-0, {PRECISION} autocast): {engine:.0f} tokens/s "
        f"(median of {_fmt(engine_windows)}); step time ratio vs the equivalent bare loop "
        f"(autocast+fused) = {overhead:.3f}, vs autocast with default AdamW = "
        f"{bare['autocast'] / engine:.3f}, vs bf16 weights = {bare['bf16-weights'] / engine:.3f}; "
        f"MFU = {mfu:.3f} ({flops_per_token / 1e9:.2f} GFLOP/token; the bare loop's "
        f"{bare['autocast+fused'] * flops_per_token / peak:.3f})",
        flush=True,
    )
    print(
        f"Ray Train + DeepSpeed (1 worker, ZeRO-1, DeepSpeed bf16 mode): {engine_z1:.0f} "
        f"tokens/s; ratio vs autocast+fused = {bare['autocast+fused'] / engine_z1:.3f}; MFU = "
        f"{engine_z1 * flops_per_token / peak:.3f}",
        flush=True,
    )

    mem = {}
    for workers in (1, 2):
        r = fit(
            engine_cfg(
                f"zero3-{workers}w",
                storage,
                *peer_overrides(),
                f"scaling.num_workers={workers}",
                "scaling.cpus_per_worker=1",
                "engine.zero_stage=3",
                "data.batch_size=1",
                "steps=2",
                "log_every=1",
                "data.synthetic_samples=64",
            )
        )
        mem[workers] = r.metrics["model_state_gib"]
        print(
            f"ZeRO-3 {workers} worker(s): model state held by the engine {mem[workers]:.2f} GiB "
            f"per worker (RSS growth through the first step "
            f"{r.metrics['model_state_rss_gib']:.2f} GiB)",
            flush=True,
        )
    mem_ratio = mem[2] / mem[1]

    speed, sparse_mem, sample_tok_s = sparse_and_sampling(args.sparse_batch, args.sparse_steps)

    b1_ok, b1_rss = 0, 0.0
    with torch.device("meta"):
        b1_params = DalleTransformer(dalle_preset("1b3")).num_params()
    if not args.skip_1b:
        with offloaded_run("1.3B", args.nvme_path):
            t0 = time.perf_counter()
            # No final checkpoint (~20 GB for 1.3B with optimizer state): metrics from the log.
            m = fit_logged(
                engine_cfg(
                    "b1",
                    storage,
                    "dalle.preset=1b3",
                    "steps=2",
                    *offload_overrides(args.nvme_path),
                    "checkpoint.at_end=false",
                )
            )[-1]
            b1_ok = int(m["step"] == 2 and m["skipped_steps"] == 0)
            b1_rss = m["peak_rss_gib_total"]
            print(
                f"1.3B ({b1_params / 1e9:.3f}B params) on 2 workers: steps ok={b1_ok}, "
                f"peak RSS {b1_rss:.1f} GiB (both workers), last step "
                f"{1 / max(m['samples_per_s'] / 2, 1e-9):.1f} s, "
                f"total {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    shutil.rmtree(storage, ignore_errors=True)
    print(
        f"overhead_ratio={overhead:.4f} mfu={mfu:.4f} zero3_mem_ratio={mem_ratio:.4f} "
        f"sparse_vs_dense={speed:.4f} sparse_mem_ratio={sparse_mem:.4f} "
        f"sample_tok_s={sample_tok_s:.2f} "
        f"b1_steps_ok={b1_ok} b1_params={b1_params} b1_peak_rss_gib={b1_rss:.2f}"
    )


if __name__ == "__main__":
    main()
