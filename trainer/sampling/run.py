"""`t2i sample`: prompts x candidates sharded over Ray actors, reranked by CLIP, written.

    driver:  prompts -> (prompt, candidate) rows -> chunks of sample.batch_size
    actors:  sample.workers of them (`num_gpus` GPUs each, as configured), each loads the recipe's
             models once (GENERATORS) and samples the chunks it is handed (ActorPool)
    driver:  progress line as chunks return; every row exactly once (`assemble`)
    actor 0: CLIP rerank of every candidate, best sample.keep per prompt written

Chunks hold their own per-candidate seeds, so the images do not depend on how rows were split.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch

from data_pipeline.config import from_dict
from data_pipeline.devices import assigned_device, enable_tf32
from trainer.progress import Progress
from trainer.sampling.ar import ArGenerator
from trainer.sampling.common import (
    Candidates,
    all_rows,
    assemble,
    clip_scores,
    clip_spec,
    generate_all,
    rerank,
    split_rows,
    write_outputs,
)
from trainer.sampling.config import SampleConfig, check_config, read_prompts
from trainer.sampling.ldm import LdmGenerator

# recipe name -> generator class: (cfg, prompts, device, log) -> callable(rows) -> Chunk
GENERATORS: dict[str, Callable] = {"ar": ArGenerator, "ldm": LdmGenerator}


def device_for_this_process() -> str:
    """The GPU only where Ray reserved one for this actor/task (data_pipeline/devices.py)."""
    return assigned_device()


def finish(cfg: SampleConfig, prompts: list[str], cand: Candidates, seconds: float) -> dict:
    """CLIP-score every candidate, keep the best, write; returns the summary."""
    scores = None
    if cfg.clip.enabled:
        with tempfile.TemporaryDirectory(prefix="t2i-clip-") as tmp:
            spec = clip_spec(cfg.clip, cfg.storage, tmp, threads=max(1, int(cfg.num_cpus)))
            scores = clip_scores(spec, cand.images, prompts)
    kept = rerank(scores, len(prompts), cfg.sample.candidates, cfg.sample.keep)
    rows = write_outputs(cfg, prompts, cand, scores, kept)
    kept_scores = [r["clip_score"] for r in rows if r["clip_score"] is not None]
    return {
        "output": cfg.output,
        "prompts": len(prompts),
        "candidates": int(cand.seeds.size),
        "images": len(rows),
        "sampling_seconds": round(seconds, 3),
        "mean_clip_score_kept": float(np.mean(kept_scores)) if kept_scores else None,
        "mean_clip_score_all": None if scores is None else float(scores.mean()),
    }


def run_sample(cfg: SampleConfig, log=print) -> dict:
    """Sample, rerank and write, all in this process; returns a summary for the caller."""
    check_config(cfg)
    prompts = read_prompts(cfg)
    t0 = time.monotonic()
    generator = GENERATORS[cfg.recipe](cfg, prompts, device_for_this_process(), log)
    cand = generate_all(generator, cfg, prompts, log)
    return finish(cfg, prompts, cand, time.monotonic() - t0)


class SampleWorker:
    """A Ray actor: the recipe's models loaded once; samples chunks; actor 0 also finishes."""

    def __init__(self, cfg_dict: dict, prompts: list[str]):
        self.cfg = from_dict(SampleConfig, cfg_dict)  # rebuilt here: never driver globals
        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        self.prompts = prompts
        device = device_for_this_process()
        enable_tf32(device)  # fp32 matmuls on TF32 tensor cores where Ray gave this actor a GPU
        self.gen = GENERATORS[self.cfg.recipe](self.cfg, prompts, device)

    def generate(self, rows: list[tuple[int, int]]):
        return self.gen(rows)

    def finish(self, cand: Candidates, seconds: float) -> dict:
        return finish(self.cfg, self.prompts, cand, seconds)


def sample_on_ray(cfg: SampleConfig, log=print) -> dict:
    """Shard every (prompt, candidate) over `sample.workers` Ray actors (call `init_ray` first)."""
    import ray
    from ray.util import ActorPool

    check_config(cfg)
    prompts = read_prompts(cfg)
    s = cfg.sample
    chunks = split_rows(all_rows(len(prompts), s.candidates), s.batch_size)
    # The configured GPUs, not what the cluster has now: an autoscaler starts GPU nodes on request.
    actor = ray.remote(SampleWorker).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=0
    )
    t0 = time.monotonic()
    workers = [actor.remote(asdict(cfg), prompts) for _ in range(min(s.workers, len(chunks)))]
    progress = Progress(f"sample ({cfg.recipe}, {len(workers)} worker(s))",
                        len(prompts) * s.candidates, "candidates")  # fmt: skip
    done = []
    try:
        pool = ActorPool(workers)
        for chunk in pool.map_unordered(lambda w, rows: w.generate.remote(rows), chunks):
            done.append(chunk)
            progress.update(len(chunk.rows))
        cand = assemble(done, len(prompts), s.candidates)
        return ray.get(workers[0].finish.remote(cand, time.monotonic() - t0))
    finally:
        for w in workers:
            ray.kill(w)


def run_as_ray_task(fn: Callable[[dict], dict], cfg, *, num_cpus: float, num_gpus: float) -> dict:
    """Run `fn(asdict(cfg))` as one Ray task with `num_gpus` GPUs as configured."""
    import ray

    task = ray.remote(fn).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    return ray.get(task.remote(asdict(cfg)))
