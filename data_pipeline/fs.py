"""One place that turns a user path into a pyarrow filesystem + path.

`/local/dir`, `relative/dir`, `file:///dir` and `s3://bucket/prefix` are accepted. For S3 the
endpoint and region come from the arguments (the job config's `storage` section) or from the
standard AWS environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_DEFAULT_REGION`).
Credentials are never passed here: pyarrow's S3 client reads them from the environment or the
AWS credential chain, so they cannot leak into configs, logs or checkpoints.

Writes are commit-style (`write_bytes_atomic`, `open_output_atomic`, `upload_file`): a reader
never sees a partial file under its final name. `upload_file` (checkpoints, exports) has no size
ceiling: on S3 it uploads straight to the final key, in parts when large.

S3 clients get retries with exponential backoff and connect/request timeouts from `S3Options`
(the job config's `storage` section via `resolve(..., storage=cfg.storage)`, else defaults).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A resolved path: the filesystem, the path inside it, and the user's original spelling."""

    fs: pafs.FileSystem
    path: str  # inside `fs`: "bucket/prefix" for S3, an absolute path locally
    uri: str  # what the user wrote, normalised; safe to log (no credentials)

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])
        uri = "/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(self.fs, path, uri)


# S3 client defaults; `StorageConfig` (trainer/config.py) carries the same values as config keys.
DEFAULT_MAX_ATTEMPTS = 10  # attempts per request, the first included (1: no retry)
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # TCP/TLS connect
DEFAULT_REQUEST_TIMEOUT_S = 60.0  # a request whose transfer stalls this long is retried
DEFAULT_PART_SIZE_MB = 64  # multipart upload part size (large files: checkpoints, exports)

# S3's multipart limits: parts of 5 MiB..5 GiB (the last may be smaller), at most 10,000 parts.
MIN_PART_BYTES = 5 << 20
MAX_PART_BYTES = 5 << 30
MAX_PARTS = 10_000


@dataclass(frozen=True)
class S3Options:
    """Retry and timeout settings of one S3 client. Retries use the AWS SDK's "standard" strategy:
    exponential backoff with jitter on throttling (503 SlowDown), 5xx, reset connections and
    timeouts. Both clients built here (pyarrow for reads/listing/small writes, boto3 for multipart
    uploads) get the same settings."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    part_size_mb: int = DEFAULT_PART_SIZE_MB

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"storage.max_attempts must be >= 1, got {self.max_attempts}")
        if self.connect_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError(
                f"storage timeouts must be > 0, got connect_timeout_s={self.connect_timeout_s}, "
                f"request_timeout_s={self.request_timeout_s}"
            )
        if not 5 <= self.part_size_mb <= 5 * 1024:
            raise ValueError(f"storage.part_size_mb must be in 5..5120, got {self.part_size_mb}")


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that keeps its retry strategy when pickled (Ray ships the storage
    filesystem to every worker; pyarrow's own pickling drops `retry_strategy` and falls back to 3
    attempts) and remembers its options for the boto3 client of `upload_file`."""

    def __init__(self, *, options: S3Options, **kwargs):
        super().__init__(
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
            connect_timeout=options.connect_timeout_s,
            request_timeout=options.request_timeout_s,
            **kwargs,
        )
        self.options = options
        self.kwargs = kwargs  # region, endpoint_override, scheme: no credentials

    def __reduce__(self):
        return (_rebuild_s3, (self.options, self.kwargs))


def _rebuild_s3(options: S3Options, kwargs: dict) -> S3FileSystem:
    return S3FileSystem(options=options, **kwargs)


def s3_options(storage: object | None = None) -> S3Options:
    """S3Options from a `StorageConfig`-like object (any object with its fields; this package does
    not import `trainer`), defaults for fields it lacks or leaves None."""
    return S3Options(
        **{
            f: getattr(storage, f)
            for f in S3Options.__dataclass_fields__
            if getattr(storage, f, None) is not None
        }
    )


def s3_filesystem(
    endpoint_url: str | None = None,
    region: str | None = None,
    options: S3Options | None = None,
) -> S3FileSystem:
    """An S3 filesystem for `endpoint_url`/`region`, defaulting to the AWS environment variables,
    with `options`' retries and timeouts (defaults when None)."""
    endpoint_url = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {"region": region or "us-east-1"}
    if endpoint_url:
        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(
                f"S3 endpoint must look like http(s)://host:port, got {endpoint_url!r}"
            )
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return S3FileSystem(options=options or S3Options(), **kwargs)


def resolve(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    storage: object | None = None,
) -> Location:
    """Resolve a local path or `s3://bucket/prefix` to a `Location`.

    `storage` is a job's `StorageConfig` (or None): its endpoint and region are used where the
    arguments leave them None, and its retry/timeout/part-size fields configure the S3 client.
    """
    if not uri:
        raise ValueError("empty path")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 path needs a bucket: {uri!r}")
        path = f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
        endpoint_url = endpoint_url or getattr(storage, "endpoint_url", None)
        region = region or getattr(storage, "region", None)
        filesystem = s3_filesystem(endpoint_url, region, s3_options(storage))
        return Location(filesystem, path, f"s3://{path}")
    if parsed.scheme == "file":
        uri = parsed.path
    elif parsed.scheme and len(parsed.scheme) > 1:  # "C:" is a drive, anything longer a scheme
        raise ValueError(
            f"unsupported path scheme {parsed.scheme!r} in {uri!r} (use a local path or s3://)"
        )
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


def absolute_uri(uri: str) -> str:
    """`uri` with a local path made absolute (Ray workers run elsewhere); s3:// and "" as is."""
    if not uri or urlparse(uri).scheme == "s3":
        return uri
    return resolve(uri).path


def ensure_dir(loc: Location) -> None:
    """Create a directory (a no-op on S3, where prefixes need no creation)."""
    if not loc.is_s3:
        loc.fs.create_dir(loc.path, recursive=True)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


STREAM_ATTEMPTS = 4  # whole reads of one object, for a body cut off mid-stream


def _read_whole(loc: Location, sink: Callable[[], Callable[[bytes], None]]) -> None:
    """Stream `loc` into a fresh `sink()` (a function taking each chunk). The S3 client retries
    failed requests, not a body cut off after its 200 (a reset mid-download: "Failed to flush
    response stream"); such a read starts again from the first byte, up to STREAM_ATTEMPTS
    times with backoff. A missing file is not retried."""
    import time

    for attempt in range(STREAM_ATTEMPTS):
        write = sink()
        try:
            with loc.fs.open_input_stream(loc.path) as src:
                while chunk := src.read(1 << 22):
                    write(chunk)
            return
        except FileNotFoundError:
            raise
        except OSError:
            if attempt + 1 == STREAM_ATTEMPTS:
                raise
            time.sleep(0.5 * 2**attempt)


def read_bytes(loc: Location) -> bytes:
    parts: list[bytes] = []

    def sink():
        parts.clear()
        return parts.append

    _read_whole(loc, sink)
    return b"".join(parts)


def download_file(loc: Location, dst: str) -> str:
    """Copy `loc` to the local file `dst` (retrying a broken stream from the start, as
    `read_bytes`); return the sha256 hex of what was written."""
    h = None
    with open(dst, "wb") as out:

        def sink():
            nonlocal h
            h = hashlib.sha256()
            out.seek(0)
            out.truncate()
            return lambda chunk: (h.update(chunk), out.write(chunk))

        _read_whole(loc, sink)
    return h.hexdigest()


def list_files(loc: Location, suffix: str = "") -> list[str]:
    """Sorted paths (inside `loc.fs`) of files below `loc` ending in `suffix`."""
    selector = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    infos = loc.fs.get_file_info(selector)
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


@contextlib.contextmanager
def open_output_atomic(loc: Location) -> Iterator:
    """A writable stream that appears under `loc` only if the block exits without error.

    Data goes to a hidden temporary name beside the target, then is renamed (S3: server-side copy
    + delete). pyarrow streams cannot abort an upload — closing one commits it — so a failed write
    is committed under the temporary name and deleted; a killed process leaves at most a `.tmp`.
    """
    parent, base = loc.path.rsplit("/", 1)
    tmp = f"{parent}/.{base}.{uuid.uuid4().hex}.tmp"
    if not loc.is_s3:
        os.makedirs(parent, exist_ok=True)
    try:
        with loc.fs.open_output_stream(tmp) as f:
            yield f
        loc.fs.move(tmp, loc.path)
    except BaseException:
        with contextlib.suppress(Exception):
            loc.fs.delete_file(tmp)
        raise


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    with open_output_atomic(loc) as f:
        f.write(data)


def plan_part_size(size: int, part_bytes: int) -> int:
    """The part size for a multipart upload of `size` bytes: `part_bytes` (at least S3's 5 MiB),
    grown in whole MiB when `size` would need more than S3's 10,000 parts. 64 MiB parts reach
    625 GiB; bigger files get bigger parts, up to S3's 5 TiB object limit."""
    part = max(part_bytes, MIN_PART_BYTES, -(-size // MAX_PARTS))
    part = -(-part // (1 << 20)) << 20  # whole MiB
    if part > MAX_PART_BYTES:
        raise ValueError(f"{size} bytes exceed S3's object size limit (10,000 parts of 5 GiB)")
    return part


def _client_settings(filesystem: pafs.S3FileSystem) -> tuple[str | None, str, S3Options]:
    """(endpoint URL, region, options) of a pyarrow S3 filesystem, for a boto3 client that talks
    to the same service. A plain pyarrow filesystem (not built here) gets our default retries."""
    if isinstance(filesystem, S3FileSystem):
        kw, options = filesystem.kwargs, filesystem.options
    else:
        kw = pafs.S3FileSystem.__reduce__(filesystem)[1][0]  # pyarrow's own constructor kwargs
        options = S3Options(
            connect_timeout_s=kw.get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT_S,
            request_timeout_s=kw.get("request_timeout") or DEFAULT_REQUEST_TIMEOUT_S,
        )
    endpoint = kw.get("endpoint_override") or None
    if endpoint:
        endpoint = f"{kw.get('scheme') or 'https'}://{endpoint}"
    return endpoint, kw.get("region") or "us-east-1", options


@functools.lru_cache(maxsize=8)
def _boto3_client(endpoint: str | None, region: str, options: S3Options):
    """A boto3 S3 client (thread-safe, cached) with `options`' retries and timeouts; credentials
    come from the environment / AWS credential chain, as for pyarrow."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": options.max_attempts, "mode": "standard"},
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.request_timeout_s,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=region, config=config
    )


def upload_file(
    src: str,
    loc: Location,
    *,
    part_bytes: int | None = None,
    on_part: Callable[[int, int], None] | None = None,
) -> None:
    """Copy the local file `src` to `loc`, of any size, so that it appears only when complete.

    Locally: a temporary file renamed into place. On S3: straight to the final key (no temporary
    key and server-side copy, whose single CopyObject stops at 5 GiB) — one PutObject up to the part
    size, else a multipart upload; S3 shows the object only once the upload completes. An error
    aborts the upload; a killed process leaves an incomplete multipart upload, which no reader
    sees (a bucket lifecycle rule, `AbortIncompleteMultipartUpload`, reclaims its parts).
    `part_bytes` overrides the configured part size; `on_part(done, total)` runs after each part.
    """
    if not loc.is_s3:
        with open(src, "rb") as f, open_output_atomic(loc) as out:
            shutil.copyfileobj(f, out, 1 << 22)
        return
    endpoint, region, options = _client_settings(loc.fs)
    client = _boto3_client(endpoint, region, options)
    bucket, key = loc.path.split("/", 1)
    size = os.path.getsize(src)
    part = plan_part_size(size, part_bytes or options.part_size_mb << 20)
    with open(src, "rb") as f:
        if size <= part:
            client.put_object(Bucket=bucket, Key=key, Body=f.read())
            return
        total = -(-size // part)
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        try:
            parts = []
            for number in range(1, total + 1):
                reply = client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=f.read(part)
                )
                parts.append({"ETag": reply["ETag"], "PartNumber": number})
                if on_part is not None:
                    on_part(number, total)
            client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


# --------------------------------------------------------------------------------------------
# Model checkpoints from s3:// (or local): a per-node cache
# --------------------------------------------------------------------------------------------

CACHE_ENV = "T2I_CACHE_DIR"  # where fetched checkpoints live; default ~/.cache/ray-t2i/checkpoints
_DONE = "fetched.json"  # written last in a cache entry, beside the copy: its sha256


@dataclass(frozen=True)
class LocalCopy:
    """A checkpoint file or directory on this node's disk.

    `sha256` is the file's sha256, or for a directory the sha256 of its sorted lines
    `<relative path>\\t<file sha256>\\n` (`tree_digest`): the value manifests record."""

    path: str  # local file or directory (an s3:// source: its copy in the node cache)
    sha256: str
    uri: str  # what the user named, normalised (safe to log)
    is_dir: bool


def cache_root() -> str:
    return os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/ray-t2i/checkpoints")


def tree_digest(file_digests: dict[str, str]) -> str:
    """sha256 of a directory from `{relative path: file sha256}` (see `LocalCopy`)."""
    h = hashlib.sha256()
    for rel in sorted(file_digests):
        h.update(f"{rel}\t{file_digests[rel]}\n".encode())
    return h.hexdigest()


def _local_tree(path: str) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path).replace(os.sep, "/")] = file_digest(full)[1]
    return out


def _s3_objects(loc: Location) -> tuple[bool, list[tuple[str, str, int]]]:
    """(is a directory, [(relative key or "", ETag, size)]) of an S3 file or prefix, sorted;
    raises FileNotFoundError when neither exists. ETags come from S3 listings (boto3): pyarrow's
    file info has sizes and times but no ETag."""
    endpoint, region, options = _client_settings(loc.fs)
    client = _boto3_client(endpoint, region, options)
    bucket, _, key = loc.path.partition("/")
    if key:
        try:
            head = client.head_object(Bucket=bucket, Key=key)
            return False, [("", head["ETag"].strip('"'), int(head["ContentLength"]))]
        except client.exceptions.ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
    prefix = f"{key.rstrip('/')}/" if key else ""
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix) :]
            if rel and not rel.endswith("/"):  # "dir/" placeholder objects are not files
                objects.append((rel, o["ETag"].strip('"'), int(o["Size"])))
    if not objects:
        raise FileNotFoundError(f"no such file or directory {loc.uri}")
    return True, sorted(objects)


def fetch_checkpoint(
    uri: str, *, storage: object | None = None, what: str = "checkpoint"
) -> LocalCopy:
    """A local path + sha256 for a checkpoint file or directory named by a user (`what`: the
    config key, for errors).

    A local path is used in place (its sha256 computed). An `s3://` file or prefix is downloaded
    once per node into `cache_root()` (env `T2I_CACHE_DIR`), under a name keyed by the URI and
    every object's ETag and size, so a changed object is fetched again and an unchanged one never
    is. Concurrent callers on one node (Ray actors of one pool) take an exclusive lock file for
    that entry: the first downloads into a temporary directory, writes its digest record and
    renames it into place; the others wait on the lock and find it done. A killed download leaves
    only a temporary directory, which no reader uses."""
    import fcntl
    import json
    import tempfile

    loc = resolve(uri, storage=storage)
    if not loc.is_s3:
        if os.path.isfile(loc.path):
            return LocalCopy(loc.path, file_digest(loc.path)[1], loc.uri, False)
        if os.path.isdir(loc.path):
            return LocalCopy(loc.path, tree_digest(_local_tree(loc.path)), loc.uri, True)
        raise FileNotFoundError(f"{what}: no such file or directory {loc.uri}")
    try:
        is_dir, objects = _s3_objects(loc)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no such file or directory {loc.uri}") from None
    key = hashlib.sha256(json.dumps([loc.uri, objects]).encode()).hexdigest()[:32]
    root = cache_root()
    os.makedirs(root, exist_ok=True)
    entry = os.path.join(root, key)
    name = os.path.basename(loc.path.rstrip("/")) or "root"
    local = os.path.join(entry, name)  # the file or directory; the digest record beside it

    def done() -> str | None:
        try:
            with open(os.path.join(entry, _DONE)) as f:
                return json.load(f)["sha256"]
        except (FileNotFoundError, KeyError, ValueError):
            return None

    if (sha := done()) is not None:  # the common case: fetched earlier, no lock needed
        return LocalCopy(local, sha, loc.uri, is_dir)
    with open(os.path.join(root, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (also on a crash)
        if (sha := done()) is not None:  # another actor fetched it while we waited
            return LocalCopy(local, sha, loc.uri, is_dir)
        tmp = tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=root)
        try:
            digests = {}
            for rel, _etag, _size in objects:
                src = loc.join(rel) if is_dir else loc
                dst = os.path.join(tmp, name, rel) if is_dir else os.path.join(tmp, name)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                digests[rel] = download_file(src, dst)
            sha = tree_digest(digests) if is_dir else digests[""]
            record = {"uri": loc.uri, "sha256": sha, "objects": objects}
            with open(os.path.join(tmp, _DONE), "w") as f:
                json.dump(record, f)
            shutil.rmtree(entry, ignore_errors=True)  # a half-renamed leftover, if any
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return LocalCopy(local, sha, loc.uri, is_dir)
