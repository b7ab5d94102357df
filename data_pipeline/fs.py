"""One place that turns a user path into a pyarrow filesystem + path.

`/local/dir`, `relative/dir`, `file:///dir` and `s3://bucket/prefix` are accepted. For S3 the
endpoint and region come from the arguments (the job config's `storage` section) or from the
standard AWS environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_DEFAULT_REGION`).
Credentials are never passed here: pyarrow's S3 client reads them from the environment or the
AWS credential chain, so they cannot leak into configs, logs or checkpoints.

Writes are commit-style (`write_bytes_atomic`, `open_output_atomic`): a reader never sees a
partial file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
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


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for `endpoint_url`/`region`, defaulting to the AWS environment variables."""
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
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, *, endpoint_url: str | None = None, region: str | None = None) -> Location:
    """Resolve a local path or `s3://bucket/prefix` to a `Location`."""
    if not uri:
        raise ValueError("empty path")
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 path needs a bucket: {uri!r}")
        path = f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
        return Location(s3_filesystem(endpoint_url, region), path, f"s3://{path}")
    if parsed.scheme == "file":
        uri = parsed.path
    elif parsed.scheme and len(parsed.scheme) > 1:  # "C:" is a drive, anything longer a scheme
        raise ValueError(
            f"unsupported path scheme {parsed.scheme!r} in {uri!r} (use a local path or s3://)"
        )
    path = os.path.abspath(os.path.expanduser(uri))
    return Location(pafs.LocalFileSystem(), path, path)


def ensure_dir(loc: Location) -> None:
    """Create a directory (a no-op on S3, where prefixes need no creation)."""
    if not loc.is_s3:
        loc.fs.create_dir(loc.path, recursive=True)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


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


def file_digest(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
