"""Checkpoints that are complete or ignored.

Layout (local dir or s3://), one directory per step:

    <storage_path>/<run>/checkpoints/step_00000100/
        ds/state/...                DeepSpeed engine state (every rank's ZeRO shards): model
                                    weights + optimizer of the part "model"
        ds_<part>/state/...         the same for each extra part (a GAN's discriminator)
        rng_rank00000.safetensors   each rank's torch RNG state
        train_state.json            step, data position (epoch, batches consumed), counters
        config.yaml                 the resolved TrainConfig
        model.safetensors           consolidated weights (final checkpoint, when exported)
        manifest.json               WRITTEN LAST: size + sha256 of every file above

A directory without a valid manifest, or whose files do not match it, is not a checkpoint: the
loader skips it (a crash mid-save leaves exactly that). We never trust DeepSpeed's `latest` file,
which it writes before its final barrier. Every rank stages its own files on local disk, uploads
them, and reports their checksums to rank 0, which writes the manifest once all uploads are done.

DeepSpeed's engine state is pickled (`torch.load(weights_only=False)` inside DeepSpeed); we only
hand DeepSpeed files whose sha256 matches the manifest that this code wrote. Exported weights are
safetensors, which cannot execute code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import pyarrow.fs as pafs

from data_pipeline import fs

FORMAT = "ray-t2i/checkpoint"
VERSION = 1
DS_TAG = "state"
_STEP_RE = re.compile(r"step_(\d{8})$")
_ZERO_SHARD_RE = re.compile(r"zero_pp_rank_(\d+)_")


@dataclass
class TrainState:
    """Where training is: saved in every checkpoint, restored on resume."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in `epoch`
    skipped_steps: int = 0  # non-finite steps skipped so far
    samples_seen: int = 0  # all ranks


def ds_dir(part: str) -> str:
    """Directory of one part's DeepSpeed state. The part "model" keeps `ds/`, the layout of every
    single-part run (and what DeepSpeed's zero_to_fp32 is pointed at); extra parts sit beside it."""
    return "ds" if part == "model" else f"ds_{part}"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def local_files(root: str) -> list[str]:
    """Relative paths of all files under `root`, sorted."""
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(out)


def upload_dir(
    local_root: str,
    dest: fs.Location,
    *,
    part_bytes: int | None = None,
    on_part: Callable[[str, int, int], None] | None = None,
) -> dict[str, dict]:
    """Copy every file under `local_root` to `dest`; return {relpath: {bytes, sha256}}.

    Files of any size go straight to their final names (`fs.upload_file`: multipart on S3, no
    5 GiB server-side-copy ceiling); each appears only once complete, and the checkpoint only once
    the manifest is written after all of them. `part_bytes` overrides the configured part size;
    `on_part(relpath, parts_done, parts_total)` reports progress of multipart uploads.
    """
    entries = {}
    for rel in local_files(local_root):
        src = os.path.join(local_root, rel)
        size, digest = fs.file_digest(src)
        progress = None if on_part is None else functools.partial(on_part, rel)
        fs.upload_file(src, dest.join(rel), part_bytes=part_bytes, on_part=progress)
        entries[rel] = {"bytes": size, "sha256": digest}
    return entries


def write_manifest(dest: fs.Location, step: int, files: dict[str, dict]) -> None:
    doc = {"format": FORMAT, "version": VERSION, "step": step, "files": dict(sorted(files.items()))}
    fs.write_bytes_atomic(dest.join("manifest.json"), json.dumps(doc, indent=2).encode())


def read_manifest(ckpt: fs.Location) -> dict | None:
    """The manifest if `ckpt` is complete (manifest valid, every file present with its size)."""
    loc = ckpt.join("manifest.json")
    try:
        doc = json.loads(fs.read_bytes(loc))
    except (OSError, ValueError):
        return None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        return None
    infos = {
        i.path: i.size
        for i in ckpt.fs.get_file_info(pafs.FileSelector(ckpt.path, recursive=True))
        if i.type == pafs.FileType.File
    }
    for rel, meta in doc.get("files", {}).items():
        if infos.get(f"{ckpt.path}/{rel}") != meta["bytes"]:
            return None
    return doc


def list_complete(run: fs.Location) -> list[tuple[int, fs.Location]]:
    """(step, location) of every complete checkpoint of a run, newest first."""
    base = run.join("checkpoints")
    try:
        infos = base.fs.get_file_info(pafs.FileSelector(base.path, allow_not_found=True))
    except OSError:
        return []
    found = []
    for info in infos:
        m = _STEP_RE.search(info.path)
        if info.type == pafs.FileType.Directory and m:
            loc = base.join(info.base_name)
            if read_manifest(loc) is not None:
                found.append((int(m.group(1)), loc))
    return sorted(found, key=lambda t: -t[0])


def download(ckpt: fs.Location, local_root: str, *, rank: int | None = None) -> dict:
    """Fetch a complete checkpoint to `local_root`, verifying every file's sha256.

    With `rank`, other ranks' ZeRO shards are skipped (same world size on resume).
    Raises ValueError naming the file on any mismatch.
    """
    doc = read_manifest(ckpt)
    if doc is None:
        raise ValueError(f"{ckpt.uri}: not a complete checkpoint")
    for rel, meta in doc["files"].items():
        m = _ZERO_SHARD_RE.search(os.path.basename(rel))
        if rank is not None and m and int(m.group(1)) != rank:
            continue
        dst = os.path.join(local_root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        h = hashlib.sha256()
        with ckpt.fs.open_input_stream(ckpt.join(rel).path) as src, open(dst, "wb") as out:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != meta["sha256"]:
            raise ValueError(f"{ckpt.join(rel).uri}: sha256 does not match the manifest")
    return doc


def prune(run: fs.Location, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (and incomplete older ones)."""
    if keep <= 0:
        return []
    complete = list_complete(run)
    if len(complete) <= keep:
        return []
    oldest_kept = complete[keep - 1][0]
    removed = []
    base = run.join("checkpoints")
    for info in base.fs.get_file_info(pafs.FileSelector(base.path, allow_not_found=True)):
        m = _STEP_RE.search(info.path)
        if info.type == pafs.FileType.Directory and m and int(m.group(1)) < oldest_kept:
            base.fs.delete_dir(info.path)
            removed.append(info.path)
    return removed


def staging_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"t2i-{prefix}-")


def state_to_json(state: TrainState) -> bytes:
    return json.dumps(asdict(state), indent=2).encode()


def find_exported(loc: fs.Location, *, weights: str, config: str, what: str) -> fs.Location:
    """`loc` itself when it holds `weights` + `config` (an exported checkpoint or a `t2i convert`
    output); else the newest complete checkpoint of the `t2i train` run at `loc` holding both.

    `what` names the artifact in the error ("image tokenizer", "DALL-E model").
    """
    if fs.exists(loc.join(weights)) and fs.exists(loc.join(config)):
        return loc
    for _, ckpt in list_complete(loc):
        if fs.exists(ckpt.join(weights)) and fs.exists(ckpt.join(config)):
            return ckpt
    raise FileNotFoundError(
        f"{loc.uri}: no {what} here: expected {weights} + {config} (an exported checkpoint or a "
        f"`t2i convert` output) or a `t2i train` run with a complete checkpoint holding {weights}"
    )
