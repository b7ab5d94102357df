"""`t2i preprocess`: the Ray Data plan from raw WebDataset shards to clean ones.

    shards (local / s3://) ─ read+validate (CPU tasks, one per shard, streamed) ─ decode/resize
      (CPU tasks) ─ size/aspect/caption filters ─ CLIP (actor pool, GPU if any) ─ threshold ─
      commit scored parts                                                     [phase 1: score]
    scored parts ─ groupby(pixel hash) ─ LSH explode ─ groupby(bucket) ─ verdicts [phase 2: dedup]
    scored parts ∪ verdicts ─ groupby(shard) ─ clean tar + quarantine + stats  [phase 3: write]
    stats.json, clip_scores.png, manifest.json (last)                           [finalize]

Exactly-once and resumable. Every committed file is written under a temporary name and renamed.
Phase 1 writes scored rows (no image bytes) as Parquet parts named by their content; a part's
footer says which shard rows it holds, so a rerun skips complete shards and, for a shard cut off
mid-way, the rows already committed. Phase 2 is a deterministic function of the scored rows and
is committed as one file. Phase 3 writes output shard i from input shard i only, samples in key
order, and skips shards already committed. Every step is deterministic (CLIP batches are padded
to a fixed shape), so a run killed anywhere and rerun gives byte-identical outputs.

Output layout under `output`:
    shards/shard-00000.tar ...        one per input shard (sorted input order); may be empty
    quarantine/shard-00000.parquet    (source_shard, key, reason, detail) per input shard
    stats.json  clip_scores.png  manifest.json (written last)
    _work/                            intermediates; removed on success unless keep_work
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import columns as C
from data_pipeline import fs, resumable
from data_pipeline.clip_score import (
    ApplyClipThreshold,
    ClipScorer,
    ClipSpec,
    clip_image_size,
    load_model_config_file,
)
from data_pipeline.config import StorageConfig
from data_pipeline.filters import ApplyFilters
from data_pipeline.manifest import MANIFEST_NAME, read_manifest, write_manifest
from data_pipeline.preprocess.config import PreprocessConfig, check_config
from data_pipeline.preprocess.dedup import dedup_phase
from data_pipeline.ray_metrics import DataStageMetrics
from data_pipeline.resumable import read_shard_task
from data_pipeline.validate import DecodeImages
from data_pipeline.webdataset_source import ReaderLimits, list_shards
from data_pipeline.writer import (
    QUARANTINE_DIR,
    SHARD_STATS_DIR,
    WORK_DIR,
    plot_histogram,
    shard_name,
    summarize,
    write_clean_shard,
)
from trainer.pretrained.clip_models import check_checkpoint

MANIFEST_FORMAT = "ray-t2i/webdataset"  # the same format `t2i data digits` writes
MANIFEST_VERSION = 1
FAULT_PHASES = ("scored", "clean")  # the kill points of `$T2I_FAULT` (resumable.Fault)
PART_META_KEY = b"t2i_part"


class PreprocessError(RuntimeError):
    """The job stopped on purpose (too much bad input); the message is the report."""


# --------------------------------------------------------------------------------------------
# Phase 1 stages (run in Ray tasks; arguments are plain data)
# --------------------------------------------------------------------------------------------


SCORED_COLUMNS = {
    C.SHARD_IDX: pa.int64(),
    C.SOURCE_SHARD: pa.string(),
    C.SEQ: pa.int64(),
    C.KEY: pa.string(),
    C.SHARD_ROWS: pa.int64(),
    C.REASON: pa.string(),
    C.DETAIL: pa.string(),
    C.WIDTH: pa.int64(),
    C.HEIGHT: pa.int64(),
    C.PIXEL_HASH: pa.string(),
    C.CLIP_SCORE: pa.float32(),
}


def commit_part(
    batch: dict[str, np.ndarray],
    *,
    parts_uri: str,
    keep_embedding: bool,
    storage: StorageConfig | None,
    fault: resumable.Fault | None = None,
) -> dict:
    """Commit a batch of scored rows as one Parquet part (`resumable.commit_part`); its footer
    also counts the quarantine reasons and, per shard, the validation failures (the bad-row
    check)."""
    n = len(batch[C.SEQ])
    arrays = {}
    for name, typ in SCORED_COLUMNS.items():
        values = batch[name] if name in batch else np.full(n, np.nan, np.float32)
        arrays[name] = pa.array(np.asarray(values).tolist(), type=typ)
    if keep_embedding and C.EMBEDDING in batch:  # only near-dedup reads them
        from ray.data.extensions import ArrowTensorArray

        arrays[C.EMBEDDING] = ArrowTensorArray.from_numpy(
            np.asarray(batch[C.EMBEDDING], np.float32)
        )
    reasons: dict[str, int] = {}
    bad: dict[str, int] = {}
    for s, reason in zip(batch[C.SHARD_IDX].tolist(), batch[C.REASON].tolist(), strict=True):
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
            if reason in C.VALIDATION_REASONS:
                bad[str(s)] = bad.get(str(s), 0) + 1
    _, name, _ = resumable.commit_part(
        pa.table(arrays),
        batch,
        parts_uri=parts_uri,
        storage=storage,
        fault=fault,
        phase="scored",
        meta_key=PART_META_KEY,
        extra={"reasons": reasons, "bad": bad},
    )
    return {"part": [name], "rows": [n]}


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Ctx(resumable.JobContext):
    cfg: PreprocessConfig
    spec: ClipSpec | None = None  # the CLIP model; None when clip.enabled=false


def result_config(cfg: PreprocessConfig) -> dict:
    """The config values that determine the outputs (not paths, resources or credentials)."""
    return resumable.result_config(cfg, extra=("max_bad_fraction",), pools=("clip",))


def _check_plan(ctx: _Ctx) -> dict:
    """Record (or check, on a rerun) what this output directory is being built from."""
    plan = {"inputs": ctx.shards, "config": result_config(ctx.cfg)}
    if ctx.spec is not None and ctx.spec.checkpoint:  # fetched (s3://) and checked here, once
        plan["clip_checkpoint_sha256"] = check_checkpoint(ctx.spec).sha256
    resumable.record_plan(
        ctx.out, plan, job="preprocess", differs="inputs or settings", log=ctx.log
    )
    return plan


def _part_summaries(ctx: _Ctx) -> list[tuple[str, dict]]:
    parts = ctx.out.join(WORK_DIR, "scored")
    out = []
    for path in fs.list_files(parts, ".parquet"):
        with ctx.out.fs.open_input_file(path) as f:
            meta = pq.read_metadata(f).metadata
        out.append((path, json.loads(meta[PART_META_KEY])))
    return out


def _phase_score(ctx: _Ctx) -> list[tuple[str, dict]]:
    import ray

    cfg = ctx.cfg
    summaries = _part_summaries(ctx)
    done: dict[int, int] = {}
    total: dict[int, int] = {}
    for _, s in summaries:
        for k, n in s["rows"].items():
            done[int(k)] = done.get(int(k), 0) + n
            total[int(k)] = s["shard_rows"][k]
    pending = [i for i in range(len(ctx.shards)) if i not in total or done[i] < total[i]]
    if not pending:
        ctx.log(f"preprocess: score: all {len(ctx.shards)} shard(s) already scored")
        return summaries
    items = []
    for i in pending:
        skip: list[int] = []
        if i in done:  # cut off mid-way: skip the rows already committed
            for path, s in summaries:
                if str(i) in s["rows"]:
                    with ctx.out.fs.open_input_file(path) as f:
                        t = pq.read_table(f, columns=[C.SHARD_IDX, C.SEQ])
                    skip += [q for s_, q in zip(t[C.SHARD_IDX].to_pylist(), t[C.SEQ].to_pylist(), strict=False)
                             if s_ == i]  # fmt: skip
        items.append({C.SHARD_IDX: i, C.SOURCE_SHARD: ctx.shards[i], "skip": json.dumps(skip)})
    ctx.log(
        f"preprocess: score: {len(pending)} of {len(ctx.shards)} shard(s) to read "
        f"({len(ctx.shards) - len(pending)} already done)"
    )
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(read_shard_task, fn_kwargs={"limits": ctx.limits, **ctx.storage})
    image_size = clip_image_size(ctx.spec) if ctx.spec else 0
    # Decode tasks reserve their worst-case memory (an RGB image at the pixel limit, plus the
    # source bytes and the resized copy). Being different from the CLIP actors' resources, this
    # also keeps Ray Data from fusing the CPU stages into the actor pool: decode must overlap
    # the model on other cores, not run inside the model's process between forward passes.
    decode_memory = max(64 << 20, 4 * cfg.validate.max_pixels)
    ds = ds.map_batches(
        DecodeImages(cfg.validate.max_pixels, image_size),
        batch_size=cfg.decode_batch_size,
        memory=decode_memory,
    )
    f = cfg.filters
    ds = ds.map_batches(
        ApplyFilters(
            f.min_side, f.max_aspect_ratio, f.min_caption_words, f.max_caption_words, f.fields
        ),  # fmt: skip
        batch_size=cfg.decode_batch_size,
        memory=decode_memory,
    )
    if ctx.spec:
        ds = ds.map_batches(
            ClipScorer,
            fn_constructor_args=(ctx.spec,),
            batch_size=cfg.clip.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.clip.concurrency),
            num_cpus=cfg.clip.num_cpus,
            num_gpus=cfg.clip.num_gpus,  # as configured: an autoscaler starts GPU nodes on request
        )
        ds = ds.map_batches(ApplyClipThreshold(cfg.clip.threshold), batch_size=None)
    ds = ds.map_batches(
        commit_part,
        batch_size=max(cfg.decode_batch_size, cfg.clip.batch_size) * 4,
        fn_kwargs={
            "parts_uri": ctx.out.join(WORK_DIR, "scored").uri,
            "keep_embedding": cfg.dedup.near,
            "fault": ctx.fault,
            **ctx.storage,
        },
    )
    commits = rows = 0
    export, t0 = DataStageMetrics("preprocess", ctx.out.uri), time.perf_counter()
    for r in ds.iter_rows():
        commits += 1
        rows += int(r["rows"])
        export.rows(rows, time.perf_counter() - t0)  # Ray dashboard: rows/s of this run
    ctx.log(f"preprocess: score: committed {rows} row(s) in {commits} part(s)")
    return _part_summaries(ctx)


def _check_bad_fraction(ctx: _Ctx, summaries: list[tuple[str, dict]]) -> None:
    totals: dict[str, int] = {}
    rows = {}
    bad_by_shard: dict[int, int] = {}
    for _, s in summaries:
        for r, n in s["reasons"].items():
            totals[r] = totals.get(r, 0) + n
        rows.update({int(k): v for k, v in s["shard_rows"].items()})
        for k, n in s["bad"].items():
            bad_by_shard[int(k)] = bad_by_shard.get(int(k), 0) + n
    n_rows = sum(rows.values())
    bad = sum(n for r, n in totals.items() if r in C.VALIDATION_REASONS)
    frac = bad / max(n_rows, 1)
    if frac > ctx.cfg.max_bad_fraction:
        by_reason = ", ".join(f"{r}={totals[r]}" for r in C.VALIDATION_REASONS if totals.get(r))
        worst = sorted(bad_by_shard.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        shards = "; ".join(f"{ctx.shards[i]}: {n} of {rows[i]}" for i, n in worst)
        raise PreprocessError(
            f"{bad} of {n_rows} samples ({frac:.1%}) failed validation, more than "
            f"max_bad_fraction={ctx.cfg.max_bad_fraction}. By reason: {by_reason}. "
            f"Worst shards: {shards}. Nothing was written to {ctx.out.join('shards').uri}; "
            f"fix the input or raise max_bad_fraction (the scoring work is kept for a rerun)."
        )


def _phase_dedup(ctx: _Ctx, parts: list[str]) -> pa.Table:
    return dedup_phase(ctx.cfg.dedup, ctx.spec, ctx.out, parts, ctx.log)


def write_shard_task(
    item: dict,
    *,
    out_uri,
    shards,
    limits,
    storage: StorageConfig | None,
    fault: resumable.Fault | None = None,
) -> dict:
    """Phase 3, one Ray task per output shard: gather its scored rows from the parts that hold
    them (the part footers say which) and its dedup verdicts, then commit the shard."""
    i = int(item[C.SHARD_IDX])
    out = fs.resolve(out_uri, storage=storage)
    tables = []
    for path in json.loads(item["parts"]):
        with out.fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=list(SCORED_COLUMNS))
        tables.append(t.filter(pc.equal(t[C.SHARD_IDX], i)))
    scored = pa.concat_tables(tables) if tables else pa.table(
        {k: pa.array([], type=t) for k, t in SCORED_COLUMNS.items()}
    )  # fmt: skip
    dedup = out.join(WORK_DIR, "dedup.parquet")
    with out.fs.open_input_file(dedup.path) as f:
        verdicts = pq.read_table(f, filters=[(C.SHARD_IDX, "=", i)])
    with resumable.commit_point(fault, "clean"):
        stats = write_clean_shard(
            scored, verdicts, out_uri=out_uri, shard_idx=i, source_uri=shards[i], limits=limits,
            storage=storage,
        )  # fmt: skip
    return {C.SHARD_IDX: i, "samples_out": stats["samples_out"]}


def _phase_write(ctx: _Ctx, summaries: list[tuple[str, dict]]) -> None:
    import ray

    committed = {
        int(os.path.basename(p)[len("shard-") : -len(".json")])
        for p in fs.list_files(ctx.out.join(SHARD_STATS_DIR), ".json")
    }
    pending = sorted(set(range(len(ctx.shards))) - committed)
    if not pending:
        ctx.log(f"preprocess: write: all {len(ctx.shards)} shard(s) already committed")
        return
    ctx.log(f"preprocess: write: {len(pending)} shard(s) to commit ({len(committed)} already done)")
    parts_of: dict[int, list[str]] = {i: [] for i in pending}
    for path, s in summaries:
        for k in s["rows"]:
            if int(k) in parts_of:
                parts_of[int(k)].append(path)
    items = [{C.SHARD_IDX: i, "parts": json.dumps(parts_of[i])} for i in pending]
    kwargs = {"out_uri": ctx.out.uri, "shards": ctx.shards, "limits": ctx.limits,
              "fault": ctx.fault, **ctx.storage}  # fmt: skip
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    commits = sum(1 for _ in ds.map(write_shard_task, fn_kwargs=kwargs).iter_rows())
    ctx.log(f"preprocess: write: committed {commits} shard(s)")


def _finalize(ctx: _Ctx, plan: dict) -> dict:
    stats_list = []
    for i in range(len(ctx.shards)):
        stats_list.append(
            json.loads(fs.read_bytes(ctx.out.join(SHARD_STATS_DIR, f"{shard_name(i)}.json")))
        )
    threshold = ctx.cfg.clip.threshold if ctx.spec else None
    stats = summarize(stats_list, threshold)
    fs.write_bytes_atomic(ctx.out.join("stats.json"), json.dumps(stats, indent=2).encode())
    fs.write_bytes_atomic(ctx.out.join("clip_scores.png"), plot_histogram(stats))
    body = {
        "dataset": "preprocess",
        "inputs": plan["inputs"],
        "config": plan["config"],
        "clip_checkpoint_sha256": plan.get("clip_checkpoint_sha256"),
        "samples": stats["samples_out"],
        "rows_in": stats["rows_in"],
        "reasons": stats["reasons"],
        "shards": [{**s["output"], "source_shard": s["source_shard"]} for s in stats_list],
        "quarantine": [f"{QUARANTINE_DIR}/{shard_name(i)}.parquet" for i in range(len(ctx.shards))],
        "stats": "stats.json",
        "plot": "clip_scores.png",
    }
    write_manifest(ctx.out, MANIFEST_FORMAT, MANIFEST_VERSION, body)
    if not ctx.cfg.keep_work:
        ctx.out.fs.delete_dir(ctx.out.join(WORK_DIR).path)
    return read_manifest(ctx.out, MANIFEST_FORMAT, (MANIFEST_VERSION,))


def build_context(cfg: PreprocessConfig, log=print) -> _Ctx:
    check_config(cfg)
    out = fs.resolve(cfg.output, storage=cfg.storage)
    limits = ReaderLimits.of(cfg.validate)
    spec = None
    if cfg.clip.enabled:
        spec = ClipSpec(
            model=cfg.clip.model,
            model_config=load_model_config_file(cfg.clip.model_config)
            if cfg.clip.model_config
            else None,
            checkpoint=fs.absolute_uri(cfg.clip.checkpoint),
            batch_size=cfg.clip.batch_size,
            threads=max(1, int(cfg.clip.num_cpus)),
            checkpoint_activation=cfg.clip.checkpoint_activation,
            storage=cfg.storage,
        )
        if not spec.checkpoint:
            log(f"preprocess: warning: clip.checkpoint is empty: {spec.model} has RANDOM weights")
    shards = list_shards(cfg.input, storage=cfg.storage)
    fault = resumable.fault_from_env("preprocess", FAULT_PHASES)
    return _Ctx(cfg, out, shards, limits, log, fault, spec)


def run_preprocess(cfg: PreprocessConfig, log=print) -> dict:
    """Run (or resume) the plan; returns the output manifest. Needs Ray initialised."""
    out = fs.resolve(cfg.output, storage=cfg.storage)
    if fs.exists(out.join(MANIFEST_NAME)):
        log(f"preprocess: {out.uri} is complete (manifest.json present); nothing to do")
        return read_manifest(out, MANIFEST_FORMAT, (MANIFEST_VERSION,))
    t0 = time.perf_counter()
    ctx = build_context(cfg, log)
    fs.ensure_dir(out)
    log(f"preprocess: {len(ctx.shards)} input shard(s) -> {out.uri}")
    plan = _check_plan(ctx)
    summaries = _phase_score(ctx)
    _check_bad_fraction(ctx, summaries)
    _phase_dedup(ctx, [p for p, _ in summaries])
    _phase_write(ctx, summaries)
    manifest = _finalize(ctx, plan)
    DataStageMetrics("preprocess", out.uri).quarantined(manifest["reasons"])
    log(f"preprocess: done in {time.perf_counter() - t0:.1f}s: {manifest['samples']} of "
        f"{manifest['rows_in']} sample(s) kept -> {out.uri}")  # fmt: skip
    return manifest
