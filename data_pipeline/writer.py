"""Committing results: one clean shard per input shard, its quarantine rows, its stats; then the
dataset-wide stats.json and CLIP-score histogram.

Output shard `i` is a pure function of input shard `i` and the verdicts on its samples: kept
samples in key order, deterministic tar headers. So a rerun can skip every shard whose tar is
already committed and still produce byte-identical outputs. Per shard, the quarantine Parquet and
the tar are committed first and the shard's stats JSON last: its presence means all three exist.

Image bytes are not carried through the Ray Data plan: the writer streams the source shard again
(the parse is deterministic, so `seq` numbers match) and copies the kept members verbatim.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline import columns as C
from data_pipeline import fs
from data_pipeline.config import StorageConfig
from data_pipeline.shards import write_shard
from data_pipeline.webdataset_source import ReaderLimits, read_shard_rows

SHARDS_DIR = "shards"
QUARANTINE_DIR = "quarantine"
WORK_DIR = "_work"
SHARD_STATS_DIR = f"{WORK_DIR}/shard_stats"
HIST_BINS = 400  # CLIP-score histogram over [-1, 1]: bin width 0.005
QUARANTINE_SCHEMA = pa.schema(
    [
        (C.SOURCE_SHARD, pa.string()),
        (C.KEY, pa.string()),
        (C.REASON, pa.string()),
        (C.DETAIL, pa.string()),
    ]
)


def shard_name(shard_idx: int) -> str:
    return f"shard-{shard_idx:05d}"


def score_histogram(scores: np.ndarray) -> np.ndarray:
    """(HIST_BINS,) int64 counts of finite scores over [-1, 1]."""
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    return np.histogram(np.clip(s, -1.0, 1.0), bins=HIST_BINS, range=(-1.0, 1.0))[0]


def _float(x) -> float:
    return np.nan if x is None else float(x)


def _round(x: float) -> float | None:
    return None if not math.isfinite(x) else round(float(x), 6)


# The fields preprocessing adds to a sample's `.json`, beside every input field (img2dataset's
# url, width/height, original_width/height, status; LAION's similarity, punsafe, pwatermark...).
OUR_FIELDS = ("source_shard", "source_key", "decoded_width", "decoded_height", "pixel_hash",
              "clip_score")  # fmt: skip


def output_fields(inputs: dict, ours: dict) -> dict:
    """A clean sample's `.json`: every input field, ours added under their own names. An input
    field that already has one of our names (an earlier t2i pass) is kept as `input_<name>`."""
    out = dict(inputs)
    for k, v in ours.items():
        if k in out:
            out[f"input_{k}"] = out.pop(k)
        out[k] = v
    return out


def sidecar_bytes(rows: list[dict]) -> bytes:
    """A shard's parquet sidecar: a column per field (the union over rows; null where a row
    lacks it). A column whose values mix types or nest (exif dicts) holds their JSON text."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        kinds = {type(v) for v in values if v is not None}
        if kinds in (set(), {int}, {float}, {str}, {bool}):
            columns[name] = pa.array(values)
        elif kinds == {int, float}:
            columns[name] = pa.array([None if v is None else float(v) for v in values])
        else:
            columns[name] = pa.array(
                [None if v is None else json.dumps(v, sort_keys=True, default=str) for v in values],
                pa.string(),
            )
    table = pa.table(columns) if columns else pa.table({"key": pa.array([], pa.string())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_clean_shard(
    scored: pa.Table,
    verdicts: pa.Table,
    *,
    out_uri: str,
    shard_idx: int,
    source_uri: str,
    limits: ReaderLimits,
    storage: StorageConfig | None,
) -> dict:
    """Commit shard `shard_idx`: quarantine part, clean tar, then its stats (the commit marker).

    `scored` holds every scored row of this shard; `verdicts` the dedup drops among them
    (shard_idx, seq, reason, detail). Returns the shard's stats dict.
    """
    out = fs.resolve(out_uri, storage=storage)
    verdict: dict[int, dict] = {int(r[C.SEQ]): r for r in scored.to_pylist()}
    for r in verdicts.to_pylist():
        v = verdict[int(r[C.SEQ])]
        if not v[C.REASON]:
            v[C.REASON], v[C.DETAIL] = r[C.REASON], r[C.DETAIL]

    source = read_shard_rows(source_uri, limits, storage=storage)
    expected = int(next(iter(verdict.values()))[C.SHARD_ROWS]) if verdict else len(source)
    if len(source) != expected or len(verdict) != expected:
        raise RuntimeError(
            f"{source_uri}: shard changed during preprocessing ({len(source)} rows now, "
            f"{expected} when scored, {len(verdict)} verdicts); rerun into a fresh output"
        )

    samples, quarantine, sidecar = [], [], []
    reasons: dict[str, int] = {}
    for row in source:
        v = verdict[row[C.SEQ]]
        if v[C.KEY] != row[C.KEY]:
            raise RuntimeError(
                f"{source_uri}: seq {row[C.SEQ]} is {row[C.KEY]!r} now, was {v[C.KEY]!r}"
            )
        reason = str(v[C.REASON])
        if reason:
            reasons[reason] = reasons.get(reason, 0) + 1
            quarantine.append((source_uri, row[C.KEY], reason, str(v[C.DETAIL])))
            continue
        meta = output_fields(
            json.loads(row.get(C.META) or "{}"),
            {
                "source_shard": source_uri,
                "source_key": row[C.KEY],
                "decoded_width": int(v[C.WIDTH]),
                "decoded_height": int(v[C.HEIGHT]),
                "pixel_hash": str(v[C.PIXEL_HASH]),
                "clip_score": _round(_float(v.get(C.CLIP_SCORE))),
            },
        )
        members = {
            row[C.IMAGE_EXT]: row[C.IMAGE],
            "txt": row[C.CAPTION].encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True, default=str).encode("utf-8"),
        }
        samples.append((row[C.KEY], members))
        sidecar.append({"key": row[C.KEY], "caption": row[C.CAPTION], **meta})
    samples.sort(key=lambda s: s[0])
    sidecar.sort(key=lambda r: r["key"])

    name = shard_name(shard_idx)
    table = pa.Table.from_pylist(
        [dict(zip(QUARANTINE_SCHEMA.names, q, strict=False)) for q in quarantine],
        schema=QUARANTINE_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.write_bytes_atomic(out.join(QUARANTINE_DIR, f"{name}.parquet"), buf.getvalue())

    scores = np.array([_float(v.get(C.CLIP_SCORE)) for v in verdict.values()], np.float64)
    # img2dataset's layout: the sidecar beside the tar, one row per sample (written first: the
    # tar's presence is what readers list, and the stats JSON below commits both).
    fs.write_bytes_atomic(out.join(SHARDS_DIR, f"{name}.parquet"), sidecar_bytes(sidecar))
    info = write_shard(out.join(SHARDS_DIR, f"{name}.tar"), samples)
    stats = {
        "shard_idx": shard_idx,
        "source_shard": source_uri,
        "rows_in": expected,
        "samples_out": len(samples),
        "reasons": dict(sorted(reasons.items())),
        "clip_hist": score_histogram(scores).tolist(),
        "output": {
            "path": f"{SHARDS_DIR}/{name}.tar",
            "samples": info.samples,
            "bytes": info.bytes,
            "sha256": info.sha256,
        },
    }
    # Committed last: its presence marks the shard done (a rerun skips it).
    fs.write_bytes_atomic(
        out.join(SHARD_STATS_DIR, f"{name}.json"), json.dumps(stats, sort_keys=True).encode()
    )
    return stats


# --------------------------------------------------------------------------------------------
# Dataset-wide summary
# --------------------------------------------------------------------------------------------


def hist_quantiles(hist: np.ndarray, qs=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)):
    """Quantiles (bin upper edges, accurate to one bin = 0.005) of a score histogram."""
    total = int(hist.sum())
    if total == 0:
        return {}
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    cdf = np.cumsum(hist)
    return {f"p{round(q * 100):02d}": round(float(edges[np.searchsorted(cdf, q * total) + 1]), 4)
            for q in qs}  # fmt: skip


def summarize(shard_stats: list[dict], threshold: float | None) -> dict:
    """stats.json: counts in/out per stage and per reason, CLIP-score quantiles."""
    reasons: dict[str, int] = {}
    for s in shard_stats:
        for r, c in s["reasons"].items():
            reasons[r] = reasons.get(r, 0) + c
    rows_in = sum(s["rows_in"] for s in shard_stats)
    stages, remaining = {}, rows_in
    for stage in C.STAGES:
        dropped = sum(c for r, c in reasons.items() if C.STAGE_OF_REASON.get(r) == stage)
        stages[stage] = {"in": remaining, "out": remaining - dropped, "dropped": dropped}
        remaining -= dropped
    hist = np.sum([np.array(s["clip_hist"], np.int64) for s in shard_stats], axis=0) if (
        shard_stats
    ) else np.zeros(HIST_BINS, np.int64)  # fmt: skip
    scored = int(hist.sum())
    return {
        "rows_in": rows_in,
        "samples_out": sum(s["samples_out"] for s in shard_stats),
        "stages": stages,
        "reasons": {r: reasons[r] for r in sorted(reasons)},
        "bad_fraction": round(
            sum(c for r, c in reasons.items() if r in C.VALIDATION_REASONS) / max(rows_in, 1), 6
        ),
        "clip": {
            "threshold": threshold,
            "scored": scored,
            "quantiles": hist_quantiles(hist),
            "histogram": {"range": [-1.0, 1.0], "bins": HIST_BINS, "counts": hist.tolist()},
        },
    }


def plot_histogram(stats: dict) -> bytes:
    """PNG of the CLIP-score histogram with the threshold marked (deterministic bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.array(stats["clip"]["histogram"]["counts"])
    edges = np.linspace(-1.0, 1.0, HIST_BINS + 1)
    nz = np.flatnonzero(counts)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if len(nz):
        lo, hi = edges[max(nz[0] - 5, 0)], edges[min(nz[-1] + 6, HIST_BINS)]
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="#4477aa")
        ax.set_xlim(min(lo, stats["clip"]["threshold"] or lo) - 0.02, hi + 0.02)
    thr = stats["clip"]["threshold"]
    if thr is not None:
        ax.axvline(thr, color="#cc3311", linestyle="--", label=f"threshold {thr}")
        ax.legend()
    ax.set_xlabel("CLIP cosine(image, text)")
    ax.set_ylabel("samples")
    ax.set_title(f"CLIP scores ({stats['clip']['scored']} scored)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
