"""Committing `t2i tokenize` output: one input shard's encoded rows -> its Parquet file(s), checked
exactly-once, then a marker; and the dataset-wide checks before the manifest.

Output for input shard i is a pure function of that shard: kept rows in input order (`seq`),
split into files of `rows_per_shard`, fixed Parquet settings and no timestamps in the metadata — so
the same input and models always give byte-identical files, and a rerun can skip every shard whose
marker (`_work/done/shard-NNNNN.json`, written last) exists.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline import columns as C
from data_pipeline import fs
from data_pipeline import token_dataset as T
from data_pipeline.config import StorageConfig
from data_pipeline.writer import WORK_DIR, shard_name

SHARDS_DIR = "shards"
DONE_DIR = f"{WORK_DIR}/done"
PARTS_DIR = f"{WORK_DIR}/parts"
ROW_GROUP_ROWS = 1024  # rows per Parquet row group: readers stream a file in these units


def output_columns(
    recipe: str, text: str = "states", flip: bool = False, buckets: bool = False
) -> list[str]:
    """The columns of an output row, in file order (recipe=ldm, `text: tokens`: no states;
    `flip`: the mirrored image's latent; `buckets`: the latent grid of the row's bucket)."""
    if recipe == "ar":
        return [C.KEY, C.CAPTION, T.TEXT_TOKENS, T.IMAGE_CODES]
    image = [T.LATENT, *([T.LATENT_FLIP] if flip else []),
             *([T.LATENT_H, T.LATENT_W] if buckets else [])]  # fmt: skip
    # text: tokens: the ids (`text_tokens`) are encoded on the training workers
    states = [T.TEXT_EMBEDDING] if text == "states" else []
    return [C.KEY, C.CAPTION, T.TEXT_TOKENS, *image, *states]


def parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes: fixed writer settings, no pandas or wall-clock metadata."""
    buf = io.BytesIO()
    pq.write_table(
        table.replace_schema_metadata(None),
        buf,
        compression="zstd",
        row_group_size=ROW_GROUP_ROWS,
        write_statistics=False,  # min/max of list columns are useless and cost time
    )
    return buf.getvalue()


def _shard_rows(out: fs.Location, parts: list[str], shard_idx: int) -> pa.Table:
    """All committed rows of one input shard, one per `seq` (a part rewritten by a retried task
    may repeat rows; encoding is deterministic, so repeats are equal and one is kept)."""
    tables = []
    for path in parts:
        with out.fs.open_input_file(path) as f:
            t = pq.read_table(f)
        tables.append(t.filter(pc.equal(t[C.SHARD_IDX], shard_idx)).replace_schema_metadata(None))
    table = pa.concat_tables(tables, promote_options="permissive")
    table = table.take(pc.sort_indices(table, [(C.SEQ, "ascending")]))
    seqs = table[C.SEQ].to_numpy()
    first = np.ones(len(seqs), bool)
    first[1:] = seqs[1:] != seqs[:-1]
    return table.filter(pa.array(first))


def write_tokenized_shard(
    item: dict,
    *,
    out_uri: str,
    recipe: str,
    rows_per_shard: int,
    storage: StorageConfig | None,
    text: str = "states",
    flip: bool = False,
    buckets: bool = False,
) -> dict:
    """Commit input shard `item["shard_idx"]` from the parts holding its rows; return its marker.

    Exactly-once check: the rows are seq 0..rows_in-1, each once; keys are unique.
    """
    i, source = int(item[C.SHARD_IDX]), item[C.SOURCE_SHARD]
    out = fs.resolve(out_uri, storage=storage)
    parts = sorted(set(json.loads(item["parts"])))
    if not parts:  # an empty input shard: nothing to write, but it is committed all the same
        marker = {"shard_idx": i, "source_shard": source, "rows_in": 0, "rows": 0,
                  "quarantine": [], "files": []}  # fmt: skip
        fs.write_bytes_atomic(
            out.join(DONE_DIR, f"{shard_name(i)}.json"), json.dumps(marker, sort_keys=True).encode()
        )
        return marker
    table = _shard_rows(out, parts, i)
    rows_in = int(table[C.SHARD_ROWS][0].as_py()) if len(table) else 0
    seqs = table[C.SEQ].to_numpy()
    if len(seqs) != rows_in or (rows_in and not np.array_equal(seqs, np.arange(rows_in))):
        missing = sorted(set(range(rows_in)) - set(seqs.tolist()))[:5]
        raise RuntimeError(
            f"{source}: {len(seqs)} encoded rows for {rows_in} input rows (missing seq "
            f"{missing}...); the shard changed during tokenization? rerun into a fresh output"
        )
    reasons = table[C.REASON].to_pylist()
    quarantine = [
        {"source_shard": source, "key": k, "reason": r, "detail": d}
        for k, r, d in zip(
            table[C.KEY].to_pylist(), reasons, table[C.DETAIL].to_pylist(), strict=True
        )
        if r
    ]
    kept = table.filter(pc.equal(table[C.REASON], ""))
    keys = kept[C.KEY].to_pylist()
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise RuntimeError(f"{source}: key {dup!r} occurs more than once")
    kept = kept.select(output_columns(recipe, text, flip, buckets))
    step = rows_per_shard or max(len(kept), 1)
    files = []
    for j, start in enumerate(range(0, len(kept), step)):
        rel = f"{SHARDS_DIR}/{shard_name(i)}-{j:04d}.parquet"
        data = parquet_bytes(kept.slice(start, step))
        fs.write_bytes_atomic(out.join(rel), data)
        rows = min(step, len(kept) - start)
        files.append({"path": rel, "rows": rows, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
    marker = {
        "shard_idx": i,
        "source_shard": source,
        "rows_in": rows_in,
        "rows": len(kept),
        "quarantine": quarantine,
        "files": files,
    }
    if buckets:  # rows per latent grid "hxw" (the manifest sums them)
        grids = zip(kept[T.LATENT_H].to_pylist(), kept[T.LATENT_W].to_pylist(), strict=True)
        counts: dict[str, int] = {}
        for h, w in grids:
            counts[f"{h}x{w}"] = counts.get(f"{h}x{w}", 0) + 1
        marker["buckets"] = counts
    # Written last: its presence marks the shard committed (a rerun skips it).
    fs.write_bytes_atomic(
        out.join(DONE_DIR, f"{shard_name(i)}.json"), json.dumps(marker, sort_keys=True).encode()
    )
    return marker


def check_unique_keys(out: fs.Location, markers: list[dict]) -> None:
    """No key in two output files (each shard already checked its own). Keys are compared as
    8-byte digests in one sorted array (~100M keys in under 2 GiB); a digest collision is
    confirmed on the key strings before it is reported."""
    files = [f["path"] for m in markers for f in m["files"]]
    digests, where = [], []
    for n, path in enumerate(files):
        for r, k in enumerate(_keys(out, path)):
            digests.append(
                int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little")
            )
            where.append((n, r))
    d = np.array(digests, np.uint64)
    order = np.argsort(d, kind="stable")
    for s in np.flatnonzero(d[order][1:] == d[order][:-1]):
        (fa, ra), (fb, rb) = where[order[s]], where[order[s + 1]]
        key_a, key_b = _keys(out, files[fa])[ra], _keys(out, files[fb])[rb]
        if key_a == key_b:
            raise RuntimeError(
                f"key {key_a!r} occurs in {files[fa]} and {files[fb]}: keys must be unique across "
                f"the dataset (rename one source's keys before tokenizing)"
            )


def _keys(out: fs.Location, rel: str) -> list[str]:
    with out.fs.open_input_file(out.join(rel).path) as fh:
        return pq.read_table(fh, columns=[C.KEY])[C.KEY].to_pylist()
