"""Deterministic WebDataset shard writing.

A shard is a tar whose members are `<key>.<ext>`; one sample's members are contiguous and keys are
unique within a shard. Every member header is fixed (mtime 0, uid/gid 0, mode 0644, no user
names), so the same samples always produce byte-identical tars — the basis for reproducible
datasets and for exactly-once resume checks.

We write tars with the standard `tarfile` module rather than `webdataset.TarWriter`, whose headers
carry the wall-clock time and the current user, making two runs differ.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from data_pipeline import fs

# A key is a path-safe token; a dot would end the key and start the extension in WebDataset.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_EXT_RE = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")

Sample = tuple[str, Mapping[str, bytes]]  # (key, {ext: payload})


@dataclass(frozen=True)
class ShardInfo:
    """What was committed: path inside the filesystem, sample count, size and checksum."""

    path: str
    samples: int
    bytes: int
    sha256: str


class _HashingWriter:
    """A write-only file object that checksums and counts what passes through it."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self._f.write(data)
        return len(data)


def _member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(payload)


def write_shard(loc: fs.Location, samples: Iterable[Sample]) -> ShardInfo:
    """Write `samples` to one tar at `loc`, atomically; return what was committed."""
    seen: set[str] = set()
    count = 0
    with fs.open_output_atomic(loc) as raw:
        out = _HashingWriter(raw)
        # Streaming mode ("w|") needs no seek, so the same code writes to local files and S3.
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                if not _KEY_RE.match(key):
                    raise ValueError(f"{loc.uri}: invalid sample key {key!r}")
                if key in seen:
                    raise ValueError(f"{loc.uri}: duplicate sample key {key!r}")
                seen.add(key)
                for ext in sorted(members):
                    if not _EXT_RE.match(ext):
                        raise ValueError(f"{loc.uri}: sample {key!r} has invalid extension {ext!r}")
                    tar.addfile(*_member(f"{key}.{ext}", members[ext]))
                count += 1
    return ShardInfo(path=loc.path, samples=count, bytes=out.size, sha256=out.sha.hexdigest())


def write_shards(
    out: fs.Location,
    samples: Iterable[Sample],
    *,
    samples_per_shard: int,
    prefix: str = "shard",
) -> list[ShardInfo]:
    """Split `samples` into tars `out/<prefix>-00000.tar`, ... of `samples_per_shard` each."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    infos: list[ShardInfo] = []
    batch: list[Sample] = []

    def flush() -> None:
        loc = out.join(f"{prefix}-{len(infos):05d}.tar")
        infos.append(write_shard(loc, batch))
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if len(batch) == samples_per_shard:
            flush()
    if batch:
        flush()
    return infos


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key runs to the first dot of the file name, the rest is the ext."""
    dirname, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{dirname}/{stem}" if dirname else stem), ext


def iter_tar_samples(data: bytes) -> Iterable[tuple[str, dict[str, bytes]]]:
    """Group a well-formed shard's members into samples (for tests and trusted data only).

    The hostile-input reader with per-sample quarantine lives in the preprocess pipeline; this
    helper raises on anything unusual.
    """
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_member_name(info.name)
            f = tar.extractfile(info)
            payload = f.read() if f else b""
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            if ext in members:
                raise ValueError(f"duplicate member {info.name!r}")
            members[ext] = payload
    if key is not None:
        yield key, members
