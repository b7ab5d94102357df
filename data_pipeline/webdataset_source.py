"""Hostile-input WebDataset reading: list shards (local or s3://, dir / glob / list) and parse one
shard into per-sample rows, quarantining what is broken instead of failing.

Why not `ray.data.read_webdataset`: it decodes inside the read task, so one bad image fails the
whole block (and the job); it groups members by "key changed since the previous member", so a key
whose members are interleaved with another's silently becomes two half samples; and it will
unpickle `.pkl`/`.pth` members if asked to decode them. Here the shard is streamed with `tarfile`
in pipe mode ("r|": no seek, so S3 objects are read as a stream, never downloaded first), every
member is checked before anything looks inside it, and each problem becomes one quarantine row
naming the shard, key, reason and detail. Decoding happens later in separate CPU tasks.

A shard's rows are produced in member order with a `seq` ordinal; the parse is deterministic, so
the same shard always yields the same rows — resume and the final writer rely on it.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from data_pipeline import columns as C
from data_pipeline import fs
from data_pipeline.config import StorageConfig
from data_pipeline.shards import split_member_name

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")  # what the shard writer accepts
_GLOB_CHARS = set("*?[")
_BRACE_RE = re.compile(r"\{([^{}]*)\}")
SIDECAR_KEY = "key"  # the column of a parquet sidecar that names the sample (img2dataset's)


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def expand_braces(entry: str) -> list[str]:
    """webdataset's shard-list spelling: `{00000..00999}` (zero-padded to the first bound's
    width) and `{a,b}`, any number of them, expanded left to right; no braces: `[entry]`."""
    m = _BRACE_RE.search(entry)
    if m is None:
        if "{" in entry or "}" in entry:
            raise ValueError(f"input: {entry!r}: unbalanced or unsupported braces")
        return [entry]
    body, head, tail = m.group(1), entry[: m.start()], entry[m.end() :]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ValueError(f"input: {entry!r}: range {{{body}}} is empty")
        width = len(r.group(1))
        options = [f"{i:0{width}d}" for i in range(lo, hi + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"input: {entry!r}: {{{body}}} is neither a..b nor a,b")
    return [x for o in options for x in expand_braces(head + o + tail)]


def list_shards(inputs: str | list[str], *, storage: StorageConfig | None = None) -> list[str]:
    """Sorted, de-duplicated shard URIs for a dir, a shard, a glob, a brace range
    (`s3://b/laion/{00000..00999}.tar`), or a list of those.

    `storage` (the job's config section) sets the S3 endpoint, region, retries and timeouts.
    Raises FileNotFoundError naming the entry that matched nothing (for a brace range: the
    first shard it names that does not exist, and how many are missing).
    """
    entries = [inputs] if isinstance(inputs, str) else list(inputs)
    if not entries:
        raise ValueError("input: no shards given")
    found: set[str] = set()
    for entry in entries:
        if "{" in entry or "}" in entry:
            found.update(_list_braces(entry, storage))
            continue
        matched = _list_entry(entry, storage)
        if not matched:
            raise FileNotFoundError(f"input: {entry!r} matches no .tar shard")
        found.update(matched)
    return sorted(found)


def _list_braces(entry: str, storage: StorageConfig | None) -> list[str]:
    """The shards a brace range names, each checked to exist with one listing per directory
    (not one request per shard: a range may name thousands)."""
    names = expand_braces(entry)
    by_dir: dict[str, list[str]] = {}
    for n in names:
        by_dir.setdefault(n.rsplit("/", 1)[0] if "/" in n else ".", []).append(n)
    missing, uris = [], []
    for parent, members in by_dir.items():
        base = fs.resolve(parent, storage=storage)
        present = set(fs.list_files(base))
        for n in members:
            loc = base.join(n.rsplit("/", 1)[-1])
            if loc.path in present:
                uris.append(_uri(base, loc.path))
            else:
                missing.append(n)
    if missing:
        raise FileNotFoundError(
            f"input: {entry!r}: {len(missing)} of {len(names)} shard(s) do not exist, "
            f"first {missing[0]!r}"
        )
    return uris


def _list_entry(entry: str, storage: StorageConfig | None) -> list[str]:
    pos = min((entry.find(c) for c in _GLOB_CHARS if c in entry), default=-1)
    if pos >= 0:
        # A glob: list recursively below its literal prefix directory, then match the full path.
        base_uri = entry[:pos].rsplit("/", 1)[0] if "/" in entry[:pos] else "."
        base = fs.resolve(base_uri, storage=storage)
        pattern = fs.resolve(entry, storage=storage).path
        paths = [p for p in fs.list_files(base) if fnmatch.fnmatchcase(p, pattern)]
        return [_uri(base, p) for p in paths]
    loc = fs.resolve(entry, storage=storage)
    info = loc.fs.get_file_info(loc.path)
    if info.type == fs.pafs.FileType.File:
        return [loc.uri]
    if info.type == fs.pafs.FileType.Directory or loc.is_s3:
        return [_uri(loc, p) for p in fs.list_files(loc, ".tar")]
    return []


def _uri(base: fs.Location, path: str) -> str:
    return f"s3://{path}" if base.is_s3 else path


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass
class ReaderLimits:
    """The subset of `PreprocessValidateSection` the reader needs (plain data: crosses Ray)."""

    max_member_bytes: int
    max_caption_bytes: int
    image_extensions: list[str]
    caption_extensions: list[str]
    unsafe_extensions: list[str]

    @classmethod
    def of(cls, validate=None) -> ReaderLimits:
        """From a `PreprocessValidateSection` (default: its defaults, the rules every clean shard
        passed, so re-checking them downstream costs nothing)."""
        if validate is None:
            from data_pipeline.preprocess.config import PreprocessValidateSection

            validate = PreprocessValidateSection()
        v = validate
        return cls(
            v.max_member_bytes,
            v.max_caption_bytes,
            list(v.image_extensions),
            list(v.caption_extensions),
            list(v.unsafe_extensions),
        )


@dataclass
class _Group:
    """One contiguous run of members sharing a key."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)


def _read_groups(stream, limits: ReaderLimits) -> Iterator[_Group | tuple[str, str]]:
    """Yield contiguous member groups, then `(CORRUPT_TAR, detail)` if the stream is damaged.

    A repeated extension inside a run starts a new group (two samples with one key back to back).
    """
    group: _Group | None = None
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if info.isdir():
                    continue
                key, ext = split_member_name(info.name.removeprefix("./"))
                if group is None or key != group.key or ext in group.members:
                    if group is not None:
                        yield group
                    group = _Group(key)
                if not info.isfile():
                    group.problems.append((C.NOT_A_FILE, f"{info.name}: tar type {info.type!r}"))
                    group.members[ext] = b""
                    continue
                if info.size > limits.max_member_bytes:
                    group.problems.append(
                        (
                            C.MEMBER_TOO_LARGE,
                            f"{info.name}: {info.size} bytes > {limits.max_member_bytes}",
                        )
                    )
                    group.members[ext] = b""  # pipe mode skips the unread data
                    continue
                f = tar.extractfile(info)
                group.members[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        # The samples already yielded are complete; the group in progress may not be.
        if group is not None:
            yield C.CORRUPT_TAR, f"damaged inside or after key {group.key!r}: {e}"
        else:
            yield C.CORRUPT_TAR, f"not a readable tar: {e}"
        return
    if group is not None:
        yield group


def _npy_is_pickle(payload: bytes) -> bool:
    """True if an .npy payload needs pickle (object dtype) — read from its header only."""
    f = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError:
        return True  # not a valid header: treat as unsafe rather than guess
    return bool(dtype.hasobject)


def _unsafe_member(key: str, members: dict[str, bytes], limits: ReaderLimits) -> str | None:
    unsafe = {e.lower() for e in limits.unsafe_extensions}
    for ext, payload in members.items():
        last = ext.rsplit(".", 1)[-1].lower()
        if last in unsafe:
            return f"{key}.{ext}: pickle-capable member, not loaded"
        if last == "npy" and _npy_is_pickle(payload):
            return f"{key}.{ext}: .npy with object dtype (pickle), not loaded"
        if last == "npz":
            return f"{key}.{ext}: .npz may hold pickled arrays, not loaded"
    return None


def _input_fields(group: _Group) -> tuple[str, str]:
    """(META json, "") for a sample: its `.json` member's fields ("{}" without one); or
    ("", detail) when the member is not a UTF-8 JSON object."""
    fields: dict = {}
    raw = group.members.get("json")
    if raw is not None:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return "", f"{group.key}.json: {e}"
        if not isinstance(obj, dict):
            return "", f"{group.key}.json: a JSON {type(obj).__name__}, not an object"
        fields.update(obj)
    return json.dumps(fields, sort_keys=True, default=str), ""


def _sample_row(group: _Group, limits: ReaderLimits) -> dict:
    """A row for one complete group: the payload, or the first reason it is quarantined."""
    row = {C.KEY: group.key, C.IMAGE: b"", C.IMAGE_EXT: "", C.CAPTION: "", C.META: "{}"}

    def bad(reason: str, detail: str) -> dict:
        return {**row, C.REASON: reason, C.DETAIL: detail}

    if not _KEY_RE.match(group.key):
        return bad(C.INVALID_KEY, f"key {group.key!r} is not a safe relative name")
    if group.problems:
        return bad(*group.problems[0])
    unsafe = _unsafe_member(group.key, group.members, limits)
    if unsafe:
        return bad(C.UNSAFE_MEMBER, unsafe)
    image_ext = next((e for e in limits.image_extensions if e in group.members), None)
    if image_ext is None:
        return bad(C.MISSING_IMAGE, f"members: {sorted(group.members)}")
    caption_ext = next((e for e in limits.caption_extensions if e in group.members), None)
    if caption_ext is None:
        return bad(C.MISSING_CAPTION, f"members: {sorted(group.members)}")
    raw = group.members[caption_ext]
    if len(raw) > limits.max_caption_bytes:
        return bad(C.CAPTION_TOO_LONG, f"{len(raw)} bytes > {limits.max_caption_bytes}")
    try:
        caption = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(C.CAPTION_NOT_UTF8, str(e))
    if not caption.strip():
        return bad(C.EMPTY_CAPTION, f"{len(raw)} bytes of whitespace" if raw else "0 bytes")
    meta, problem = _input_fields(group)
    if problem:
        return bad(C.INVALID_JSON, problem)
    return {
        **row,
        C.IMAGE: group.members[image_ext],
        C.IMAGE_EXT: image_ext,
        C.CAPTION: caption.strip(),
        C.META: meta,
        C.REASON: "",
        C.DETAIL: "",
    }


def parse_shard(stream, limits: ReaderLimits) -> list[dict]:
    """All rows of one shard stream, in member order, each with `seq`, `key`, `reason`, `detail`.

    Buffers the groups of one shard (shards are bounded, typically <= 1 GB) because whether a key
    is non-contiguous or duplicated is known only after the whole shard has been seen.
    """
    items = list(_read_groups(stream, limits))
    runs: dict[str, list[int]] = {}  # key -> indices of its groups
    for i, item in enumerate(items):
        if isinstance(item, _Group):
            runs.setdefault(item.key, []).append(i)
    rows: list[dict] = []
    emitted: set[str] = set()
    for item in items:
        if not isinstance(item, _Group):
            reason, detail = item
            rows.append({C.KEY: "", C.IMAGE: b"", C.IMAGE_EXT: "", C.CAPTION: "", C.META: "{}",
                         C.REASON: reason, C.DETAIL: detail})  # fmt: skip
            continue
        idx = runs[item.key]
        if len(idx) == 1:
            rows.append(_sample_row(item, limits))
            continue
        # A key in several runs: disjoint member sets are one sample split up (non-contiguous);
        # overlapping sets are the key reused. Both are reported once per key, on its first run;
        # a reused key keeps its first complete sample.
        if item.key in emitted:
            continue
        emitted.add(item.key)
        groups = [items[j] for j in idx]
        exts = [set(g.members) for g in groups]
        overlapping = any(exts[a] & exts[b] for a in range(len(exts)) for b in range(a))
        if overlapping:
            rows.append(_sample_row(item, limits))
            for _ in groups[1:]:
                rows.append({C.KEY: item.key, C.IMAGE: b"", C.IMAGE_EXT: "", C.CAPTION: "",
                             C.META: "{}", C.REASON: C.DUPLICATE_KEY,
                             C.DETAIL: f"key seen in {len(groups)} places; first kept"})  # fmt: skip
        else:
            rows.append({C.KEY: item.key, C.IMAGE: b"", C.IMAGE_EXT: "", C.CAPTION: "",
                         C.META: "{}", C.REASON: C.NONCONTIGUOUS_KEY,
                         C.DETAIL: f"members {sorted(set().union(*exts))} split into "
                                   f"{len(groups)} runs"})  # fmt: skip
    for seq, row in enumerate(rows):
        row[C.SEQ] = seq
    return rows


def read_shard_rows(
    uri: str,
    limits: ReaderLimits,
    *,
    storage: StorageConfig | None = None,
    sidecar: bool = True,
) -> list[dict]:
    """Stream one shard from local disk or S3 (`storage`: the job's config section) and parse it
    (`parse_shard`), with its parquet sidecar's rows where one lies beside it (`sidecar=False`:
    not looked for, for readers that need no input fields)."""
    loc = fs.resolve(uri, storage=storage)
    try:
        stream = loc.fs.open_input_stream(loc.path)
    except OSError as e:
        raise StorageReadError(f"{uri}: cannot open the shard: {e}") from e
    with stream:
        rows = parse_shard(_StorageErrors(stream, uri), limits)
    side = read_sidecar(loc) if sidecar else None
    if side:  # each sample's sidecar row, overlaid with its own .json member
        for r in rows:
            if r[C.KEY] in side and not r[C.REASON]:
                r[C.META] = json.dumps({**side[r[C.KEY]], **json.loads(r[C.META])},
                                       sort_keys=True, default=str)  # fmt: skip
    return rows


def sidecar_location(shard: fs.Location) -> fs.Location:
    """`NNNNN.parquet` beside `NNNNN.tar` (img2dataset's layout)."""
    stem = shard.path.removesuffix(".tar")
    return fs.Location(shard.fs, f"{stem}.parquet", f"{shard.uri.removesuffix('.tar')}.parquet")


def read_sidecar(shard: fs.Location) -> dict[str, dict] | None:
    """{key: row} of the shard's parquet sidecar, or None when it has none. A sidecar that is not
    Parquet or has no `key` column stops the job naming it (bad input, not a bad sample)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    side = sidecar_location(shard)
    if not shard.path.endswith(".tar"):
        return None
    try:
        if not fs.exists(side):
            return None
        with side.fs.open_input_file(side.path) as f:
            data = f.read()
    except OSError as e:  # storage, not the data: the job stops naming it (a rerun resumes)
        raise StorageReadError(f"{side.uri}: cannot read the parquet sidecar: {e}") from e
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{side.uri}: not a readable parquet sidecar: {e}") from e
    if SIDECAR_KEY not in table.column_names:
        raise ValueError(
            f"{side.uri}: parquet sidecar has no {SIDECAR_KEY!r} column "
            f"(columns: {table.column_names[:12]})"
        )
    return {str(r[SIDECAR_KEY]): r for r in table.to_pylist() if r[SIDECAR_KEY] is not None}


class StorageReadError(RuntimeError):
    """Storage failed under a shard (after the S3 client's retries): the job stops naming it,
    and a rerun resumes. Never a verdict on the data: a damaged tar is quarantined as
    `corrupt_tar`, a storage error is not, or a transient outage would drop whole shards."""


class _StorageErrors:
    """A shard stream whose read errors surface as StorageReadError, which the tar reader does
    not mistake for damage inside the tar (it quarantines on OSError)."""

    def __init__(self, stream, uri: str):
        self.stream, self.uri = stream, uri

    def read(self, n: int = -1) -> bytes:
        try:
            return self.stream.read(n)
        except OSError as e:
            raise StorageReadError(f"{self.uri}: storage error while reading: {e}") from e
