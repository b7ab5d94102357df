"""`t2i tokenize`: the Ray Data plan from clean shards to a token (ar) or latent (ldm) dataset.

    clean shards ─ read (CPU task per shard) ─ decode + resize (CPU) ─ text BPE (CPU)
      ─ image tokenizer (actor pool, GPU if any) ─ [ldm: text encoder (actor pool)]
      ─ commit parts (_work/parts)                                  [encode: streamed]
    per input shard, as soon as all its rows are committed:
      parts ─ exactly-once check ─ shards/shard-NNNNN-JJJJ.parquet ─ marker   [write]
    manifest.json (written last)                                    [finalize]

The plan streams: rows flow through the stages in blocks and are committed as Parquet parts, and a
shard's output files are written by a Ray task while later shards are still being encoded.
Resumable and exactly-once: parts are named by the rows they hold, a rerun skips committed shards
and committed rows, and output shard i is a pure function of input shard i, so a run killed
anywhere and rerun gives byte-identical outputs. The text tokenizer (BPE trained on the captions,
deterministically) is written to `text_tokenizer.json` before any row is encoded.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import columns as C
from data_pipeline import fs, resumable
from data_pipeline import token_dataset as T
from data_pipeline.manifest import MANIFEST_NAME, write_manifest
from data_pipeline.ray_metrics import DataStageMetrics
from data_pipeline.resumable import read_shard_task
from data_pipeline.text_tokens import MANIFEST_KEY, CaptionSample, TextTokenizer
from data_pipeline.tokenize import sd
from data_pipeline.tokenize.config import TokenizeConfig, check_config
from data_pipeline.tokenize.stages import (
    PART_META_KEY,
    DecodeBuckets,
    DecodeSquare,
    EmbedText,
    EncodeImages,
    ImageEncoderSpec,
    TextEncoderSpec,
    TokenizeText,
    commit_part,
)
from data_pipeline.tokenize.writer import (
    DONE_DIR,
    PARTS_DIR,
    check_unique_keys,
    write_tokenized_shard,
)
from data_pipeline.webdataset_source import ReaderLimits, list_shards, read_shard_rows
from data_pipeline.writer import QUARANTINE_SCHEMA, WORK_DIR, shard_name

TEXT_TOKENIZER_FILE = "text_tokenizer.json"
FAULT_PHASES = ("parts", "shards")  # the kill points of `$T2I_FAULT` (resumable.Fault)


@dataclass
class _Ctx(resumable.JobContext):
    cfg: TokenizeConfig


# --------------------------------------------------------------------------------------------
# Models, text tokenizer, plan record
# --------------------------------------------------------------------------------------------


def _captions_task(item: dict, *, limits, storage, k: int = 500_000) -> list[dict]:
    """One shard's share of the BPE sample: its bottom-k captions (`CaptionSample`), each row
    also carrying the shard's caption count `n`."""
    rows = read_shard_rows(item["uri"], limits, storage=storage, sidecar=False)
    sample = CaptionSample(k)
    for r in rows:
        if not r[C.REASON]:
            sample.add((item["i"], r[C.SEQ]), r[C.CAPTION])
    return [{"i": item["i"], C.SEQ: ident[1], "h": h, C.CAPTION: c, "n": sample.seen}
            for h, ident, c in sample.items()]  # fmt: skip


def driver_peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)


def _text_tokenizer(ctx: _Ctx) -> TextTokenizer:
    """Load the one this output already holds, or reuse / build / train it, and store it."""
    import ray

    t = ctx.cfg.text_tokenizer
    loc = ctx.out.join(TEXT_TOKENIZER_FILE)
    if fs.exists(loc):
        tok = TextTokenizer.load(loc)
    elif ctx.cfg.pretrained:  # the pipeline's own tokenizer
        tok = sd.text_tokenizer(ctx.cfg)
    elif t.path:
        tok = TextTokenizer.load(fs.resolve(t.path, storage=ctx.cfg.storage))
    elif t.kind == "open_clip":
        tok = TextTokenizer.open_clip(t.text_len)
    else:  # train a BPE on a sample of the captions of the first `train_shards` shards
        uris = ctx.shards[: t.train_shards or None]
        items = [{"i": i, "uri": u} for i, u in enumerate(uris)]
        k = t.train_captions
        ds = ray.data.from_items(items, override_num_blocks=len(items)).flat_map(
            _captions_task, fn_kwargs={"limits": ctx.limits, **ctx.storage, "k": k}
        )
        sample, total = CaptionSample(k), {}
        for r in ds.iter_rows():  # streamed: the driver holds at most k captions
            sample.add((r["i"], r[C.SEQ]), r[C.CAPTION], rank=r["h"])
            total[r["i"]] = r["n"]
        n = sum(total.values())
        ctx.log(f"tokenize: training a {t.vocab_size}-id BPE on {len(sample)} of {n} caption(s) "
                f"(text_tokenizer.train_captions={k}); driver peak RSS "
                f"{driver_peak_rss_gib():.2f} GiB")  # fmt: skip
        tok = TextTokenizer.train(sample.captions(), t.vocab_size, t.text_len,
                                  lowercase=t.lowercase)  # fmt: skip
    if ctx.cfg.pretrained:
        if tok.kind != "clip_folder":
            raise ValueError(f"{loc.uri}: holds a {tok.kind} tokenizer, not the pipeline's")
    elif (tok.kind, tok.text_len) != (t.kind, t.text_len) or (
        t.kind == "bpe" and tok.vocab_size != t.vocab_size
    ):
        raise ValueError(
            f"text tokenizer {tok!r} does not match text_tokenizer.kind={t.kind}, "
            f"vocab_size={t.vocab_size}, text_len={t.text_len}"
        )
    if not fs.exists(loc):
        tok.save(loc)
    return tok


def _text_encoder_spec(cfg: TokenizeConfig) -> TextEncoderSpec:
    from data_pipeline.clip_score import load_model_config_file

    e = cfg.text_encoder
    return TextEncoderSpec(
        model=e.model,
        model_config=load_model_config_file(e.model_config) if e.model_config else None,
        checkpoint=fs.absolute_uri(e.checkpoint),
        batch_size=e.batch_size,
        threads=max(1, int(e.num_cpus)),
        checkpoint_activation=e.checkpoint_activation,
        storage=cfg.storage,
        pretrained=sd.absolute(cfg.pretrained),
    )


def _text_encoder_sha256(spec: TextEncoderSpec) -> str:
    """Fetch (s3://) and check the text encoder's checkpoint once, on the driver: its sha256."""
    from trainer.pretrained.clip_models import ClipSpec, check_checkpoint

    if not spec.checkpoint:
        return ""
    clip_spec = ClipSpec(spec.model, spec.model_config, spec.checkpoint, spec.batch_size, 1,
                         spec.checkpoint_activation, spec.storage)  # fmt: skip
    return check_checkpoint(clip_spec, what="text_encoder.checkpoint").sha256


def _describe_models(ctx: _Ctx, text: TextTokenizer) -> dict:
    """What the manifest says about the models (loads the image tokenizer once, on the driver)."""
    from trainer.pretrained.image_tokenizers import load_image_tokenizer

    cfg = ctx.cfg
    tok = load_image_tokenizer(sd.image_tokenizer_path(cfg), storage=cfg.storage)
    want_discrete = cfg.recipe == "ar"
    if tok.discrete != want_discrete:
        raise ValueError(
            f"image_tokenizer.path: {cfg.image_tokenizer.path} is a {tok.kind}, but recipe="
            f"{cfg.recipe} needs a {'dVAE or VQGAN' if want_discrete else 'KL autoencoder'}"
        )
    grid = tok.grid(cfg.image_size)  # raises if image_size is not a multiple of downsample
    body = {
        "recipe": cfg.recipe,
        "image_size": cfg.image_size,
        "image_tokenizer": tok.describe(),
        MANIFEST_KEY: {"file": TEXT_TOKENIZER_FILE, **text.describe()},
        "text_vocab": text.vocab_size,
        "text_len": text.text_len,
        "text_pad_id": text.pad_id,
        "columns": None,  # filled by _finalize
    }
    if cfg.recipe == "ldm":
        body["flip"] = cfg.flip  # rows carry `latent_flip` (`ldm.random_flip` needs it)
    if cfg.buckets:  # every bucket's latent grid (the rows per bucket: `_finalize`)
        body["buckets"] = {
            "step": cfg.bucket_step,
            "max_ratio": cfg.bucket_max_ratio,
            "shapes": [{"size": [h, w], "latent_shape": [tok.latent_channels, tok.grid(h),
                                                          tok.grid(w)]}
                       for h, w in _buckets(cfg)],
        }  # fmt: skip
    if want_discrete:
        from data_pipeline.tokenize.stages import code_dtype

        body.update(image_vocab=tok.vocab_size, image_grid=grid,
                    image_codes_dtype=code_dtype(tok.vocab_size).name)  # fmt: skip
    elif cfg.pretrained:  # a Stable Diffusion pipeline folder: its VAE and text encoder
        width, encoder = sd.describe_text_encoder(cfg, text)
        body["image_tokenizer"]["path"] = sd.image_tokenizer_path(cfg)
        body.update(
            latent_shape=[tok.latent_channels, grid, grid],
            scaling_factor=tok.scaling_factor,
            text_embedding_shape=[text.text_len, width],
            text_encoder=encoder,
            pretrained=sd.absolute(cfg.pretrained),
        )
    else:
        from data_pipeline.clip_score import open_clip_config

        spec = _text_encoder_spec(cfg)
        text_cfg = open_clip_config(spec)["text_cfg"]
        if int(text_cfg.get("context_length", 77)) != text.text_len:
            raise ValueError(
                f"text_tokenizer.text_len={text.text_len} but text encoder {spec.model} has "
                f"context_length={text_cfg.get('context_length', 77)}; set them equal"
            )
        path = sd.image_tokenizer_path(cfg)  # decodes samples (ldm): absolute, for Ray workers
        body["image_tokenizer"]["path"] = path if "://" in path else os.path.abspath(path)
        body.update(
            latent_shape=[tok.latent_channels, grid, grid],
            scaling_factor=tok.scaling_factor,
            text_embedding_shape=[text.text_len, int(text_cfg["width"])],
            text_encoder={
                "model": spec.model,
                "checkpoint": spec.checkpoint,  # absolute: encodes prompts at sampling
                "model_config": spec.model_config,
                "checkpoint_sha256": _text_encoder_sha256(spec),
            },
        )
    return body


def _buckets(cfg: TokenizeConfig) -> list[tuple[int, int]]:
    """The (H, W) aspect-ratio buckets (`buckets: true`), else []."""
    from data_pipeline.tokenize.buckets import compute_buckets

    return compute_buckets(cfg.image_size, cfg.bucket_step, cfg.bucket_max_ratio) if (
        cfg.buckets) else []  # fmt: skip


def _bucket_counts(body: dict, markers: list[dict]) -> dict:
    """`buckets`: the manifest's bucket list with each bucket's row count (from the markers)."""
    if "buckets" not in body:
        return {}
    counts: dict[str, int] = {}
    for m in markers:
        for grid, n in m.get("buckets", {}).items():
            counts[grid] = counts.get(grid, 0) + n
    shapes = [{**s, "rows": counts.get("{}x{}".format(*s["latent_shape"][1:]), 0)}
              for s in body["buckets"]["shapes"]]  # fmt: skip
    return {"buckets": {**body["buckets"], "shapes": shapes}}


def _write_empty_caption(ctx: _Ctx, text: TextTokenizer) -> dict:
    """recipe=ldm: the text encoder's states for "" (classifier-free guidance's unconditional
    branch), written once beside the dataset; returns the manifest entry (file + sha256)."""
    import hashlib

    from data_pipeline.tokenize.stages import EmbedText

    tokens = text.encode([""])  # (1, L)
    states = EmbedText(_text_encoder_spec(ctx.cfg)).encode(tokens)  # (1, L*D) float16
    length = text.text_len
    data = T.empty_caption_bytes(states.reshape(length, -1), tokens[0] != text.pad_id)
    fs.write_bytes_atomic(ctx.out.join(T.EMPTY_CAPTION_FILE), data)
    return {
        "file": T.EMPTY_CAPTION_FILE,
        "sha256": hashlib.sha256(data).hexdigest(),
        "text_tokens": tokens[0].tolist(),  # text: tokens: dropped captions train on these ids
    }


def _check_plan(ctx: _Ctx, body: dict) -> None:
    """Record (or, on a rerun, compare) what this output is being built from."""
    d = resumable.result_config(ctx.cfg, pools=("image_tokenizer", "text_encoder"))
    plan = {"inputs": ctx.shards, "config": d, "models": body}
    resumable.record_plan(
        ctx.out, plan, job="tokenize", differs="inputs, settings or models", log=ctx.log
    )


# --------------------------------------------------------------------------------------------
# Encode + write
# --------------------------------------------------------------------------------------------


def _committed(ctx: _Ctx) -> tuple[set[int], dict[int, list[str]], dict[int, int], dict[int, int]]:
    """(shards with markers, parts per shard, committed rows per shard, rows per shard)."""
    done = {int(os.path.basename(p)[6:11]) for p in fs.list_files(ctx.out.join(DONE_DIR), ".json")}
    parts: dict[int, list[str]] = {}
    rows: dict[int, int] = {}
    total: dict[int, int] = {}
    for path in fs.list_files(ctx.out.join(PARTS_DIR), ".parquet"):
        with ctx.out.fs.open_input_file(path) as f:
            meta = json.loads(pq.read_metadata(f).metadata[PART_META_KEY])
        for k, n in meta["rows"].items():
            parts.setdefault(int(k), []).append(path)
            rows[int(k)] = rows.get(int(k), 0) + n
            total[int(k)] = meta["shard_rows"][k]
    return done, parts, rows, total


def _skip_list(ctx: _Ctx, paths: list[str], shard_idx: int) -> list[int]:
    skip = []
    for path in paths:
        with ctx.out.fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=[C.SHARD_IDX, C.SEQ])
        skip += [q for s, q in zip(t[C.SHARD_IDX].to_pylist(), t[C.SEQ].to_pylist(), strict=True)
                 if s == shard_idx]  # fmt: skip
    return skip


def _build_plan(ctx: _Ctx, items: list[dict], text: TextTokenizer):
    """The streaming Ray Data plan for the shards in `items` (ending in committed parts)."""
    import ray

    cfg = ctx.cfg
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.flat_map(read_shard_task, fn_kwargs={"limits": ctx.limits, **ctx.storage})
    # Decode reserves its worst case (an RGB image at the pixel limit); a different resource
    # shape also keeps Ray Data from fusing CPU work into the model actors' processes.
    buckets = _buckets(cfg)
    decode = DecodeBuckets(cfg.image_size, cfg.max_pixels, buckets) if buckets else DecodeSquare(
        cfg.image_size, cfg.max_pixels)  # fmt: skip
    ds = ds.map_batches(
        decode,
        batch_size=cfg.decode_batch_size,
        memory=(512 << 20) + 4 * cfg.max_pixels,  # process baseline + pixels
    )
    ds = ds.map_batches(TokenizeText(text.to_bytes()), batch_size=cfg.decode_batch_size)
    it = cfg.image_tokenizer
    spec = ImageEncoderSpec(
        sd.image_tokenizer_path(cfg), cfg.storage, it.batch_size, max(1, int(it.num_cpus)),
        flip=cfg.flip, buckets=tuple(buckets), image_size=cfg.image_size,
    )  # fmt: skip
    ds = ds.map_batches(
        EncodeImages,
        fn_constructor_args=(spec,),
        batch_size=it.batch_size,
        compute=ray.data.ActorPoolStrategy(size=it.concurrency),
        num_cpus=it.num_cpus,
        num_gpus=it.num_gpus,  # as configured: an autoscaler starts GPU nodes on request
    )
    if cfg.recipe == "ldm" and cfg.text == "states":  # tokens: encoded on the training workers
        e = cfg.text_encoder
        ds = ds.map_batches(
            EmbedText,
            fn_constructor_args=(_text_encoder_spec(cfg),),
            batch_size=e.batch_size,
            compute=ray.data.ActorPoolStrategy(size=e.concurrency),
            num_cpus=e.num_cpus,
            num_gpus=e.num_gpus,
        )
    return ds.map_batches(
        commit_part,
        batch_size=max(cfg.decode_batch_size, it.batch_size) * 4,
        fn_kwargs={"parts_uri": ctx.out.join(PARTS_DIR).uri, "fault": ctx.fault, **ctx.storage},
    )


def write_shard_task(item: dict, *, fault: resumable.Fault | None, **kwargs) -> dict:
    """Ray task: commit one output shard (`write_tokenized_shard`), a "shards" commit point."""
    with resumable.commit_point(fault, "shards"):
        return write_tokenized_shard(item, **kwargs)


def _encode_and_write(ctx: _Ctx, text: TextTokenizer) -> None:
    """Stream pending rows to parts; launch each shard's write as soon as its rows are in."""
    import ray

    done, parts, rows, total = _committed(ctx)
    writer = ray.remote(num_cpus=0.5)(write_shard_task)
    kwargs = {"out_uri": ctx.out.uri, "recipe": ctx.cfg.recipe, "fault": ctx.fault,
              "rows_per_shard": ctx.cfg.rows_per_shard, "text": ctx.cfg.text,
              "flip": ctx.cfg.flip, "buckets": ctx.cfg.buckets, **ctx.storage}  # fmt: skip
    writes: dict[int, ray.ObjectRef] = {}

    def launch(i: int) -> None:
        if i not in done and i not in writes and i in total and rows[i] >= total[i]:
            item = {C.SHARD_IDX: i, C.SOURCE_SHARD: ctx.shards[i], "parts": json.dumps(parts[i])}
            writes[i] = writer.remote(item, **kwargs)

    for i in list(total):
        launch(i)
    pending = [i for i in range(len(ctx.shards)) if i not in done and i not in writes]
    ctx.log(f"tokenize: {len(ctx.shards)} shard(s): {len(done)} committed, "
            f"{len(writes)} encoded, {len(pending)} to encode")  # fmt: skip
    if pending:
        items = [{C.SHARD_IDX: i, C.SOURCE_SHARD: ctx.shards[i],
                  "skip": json.dumps(_skip_list(ctx, parts.get(i, []), i))}
                 for i in pending]  # fmt: skip
        t0 = last = time.perf_counter()
        new_rows = 0
        export = DataStageMetrics("tokenize", ctx.out.uri)  # Ray dashboard: rows/s of this run
        for r in _build_plan(ctx, items, text).iter_rows():
            meta = json.loads(r["meta"])
            for k, n in meta["rows"].items():
                i = int(k)
                parts.setdefault(i, []).append(r["part"])
                rows[i] = rows.get(i, 0) + n
                total[i] = meta["shard_rows"][k]
                new_rows += n
                launch(i)
            export.rows(new_rows, time.perf_counter() - t0)
            if time.perf_counter() - last > 5:
                last = time.perf_counter()
                ctx.log(f"tokenize: encoded {new_rows} row(s), {len(writes)}/{len(ctx.shards)} "
                        f"shard(s) writing/written, {new_rows / (last - t0):.1f} rows/s")  # fmt: skip
    for i in range(len(ctx.shards)):
        if i in total and rows[i] < total[i]:
            raise RuntimeError(f"tokenize: {ctx.shards[i]}: {rows[i]} of {total[i]} rows encoded")
        if i not in done and i not in writes:  # the reader found no rows: an empty shard
            item = {C.SHARD_IDX: i, C.SOURCE_SHARD: ctx.shards[i], "parts": "[]"}
            writes[i] = writer.remote(item, **kwargs)
    ray.get(list(writes.values()))


def _finalize(ctx: _Ctx, body: dict) -> dict:
    markers = [json.loads(fs.read_bytes(ctx.out.join(DONE_DIR, f"{shard_name(i)}.json")))
               for i in range(len(ctx.shards))]  # fmt: skip
    check_unique_keys(ctx.out, markers)
    quarantine = [q for m in markers for q in m["quarantine"]]
    reasons: dict[str, int] = {}
    for q in quarantine:
        reasons[q["reason"]] = reasons.get(q["reason"], 0) + 1
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA), buf)
    fs.write_bytes_atomic(ctx.out.join("quarantine.parquet"), buf.getvalue())
    rows_in = sum(m["rows_in"] for m in markers)
    rows = sum(m["rows"] for m in markers)
    if rows != rows_in - len(quarantine):  # each marker checked its shard; this is the sum
        raise RuntimeError(f"tokenize: {rows} rows written for {rows_in} in - {len(quarantine)}")
    from data_pipeline.tokenize.writer import output_columns

    body = {
        **body,
        "columns": output_columns(ctx.cfg.recipe, ctx.cfg.text, ctx.cfg.flip, ctx.cfg.buckets),
        "inputs": ctx.shards,
        "rows": rows,
        "exactly_once": {
            "rows_in": rows_in,
            "quarantined": len(quarantine),
            "rows": rows,
            "unique_keys": True,
        },  # fmt: skip
        "quarantine": {"file": "quarantine.parquet", "reasons": dict(sorted(reasons.items()))},
        **_bucket_counts(body, markers),
        "shards": [{**f, "source_shard": m["source_shard"]} for m in markers for f in m["files"]],
    }
    fmt, version = (T.FORMAT, T.VERSION) if ctx.cfg.recipe == "ar" else (
        T.LATENT_FORMAT, T.LATENT_VERSION)  # fmt: skip
    write_manifest(ctx.out, fmt, version, body)
    if not ctx.cfg.keep_work:
        ctx.out.fs.delete_dir(ctx.out.join(WORK_DIR).path)
    return T.read_any_manifest(ctx.out)


def run_tokenize(cfg: TokenizeConfig, log=print) -> dict:
    """Run (or resume) the plan; returns the dataset manifest. Needs Ray initialised."""
    check_config(cfg)
    out = fs.resolve(cfg.output, storage=cfg.storage)
    if fs.exists(out.join(MANIFEST_NAME)):
        log(f"tokenize: {out.uri} is complete (manifest.json present); nothing to do")
        return T.read_any_manifest(out)
    t0 = time.perf_counter()
    shards = list_shards(cfg.input, storage=cfg.storage)
    fault = resumable.fault_from_env("tokenize", FAULT_PHASES)
    ctx = _Ctx(cfg, out, shards, ReaderLimits.of(), log, fault)
    fs.ensure_dir(out)
    log(f"tokenize: recipe={cfg.recipe}: {len(shards)} input shard(s) -> {out.uri}")
    text = _text_tokenizer(ctx)
    body = _describe_models(ctx, text)
    _check_plan(ctx, body)
    if cfg.recipe == "ldm":
        body["text"] = cfg.text  # states | tokens: what the rows carry (`T.read_latent_dataset`)
        body["empty_caption"] = _write_empty_caption(ctx, text)
    _encode_and_write(ctx, text)
    manifest = _finalize(ctx, body)
    DataStageMetrics("tokenize", out.uri).quarantined(manifest["quarantine"]["reasons"])
    log(f"tokenize: done in {time.perf_counter() - t0:.1f}s: {manifest['rows']} row(s) in "
        f"{len(manifest['shards'])} file(s) -> {out.uri}; "
        f"driver_peak_rss_gib={driver_peak_rss_gib():.3f}")  # fmt: skip
    return manifest
