"""Checkpoints that are complete or ignored: the storage layout, and the loop's `save`/`resume`.

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

DeepSpeed's engine state is pickled, and DeepSpeed 0.19 loads it with
`torch.load(weights_only=False)`, which runs whatever a pickle says. The manifest sits in the same
bucket, so its sha256 catches corruption, not a planted file. `download` therefore also loads
every `.pt` file once with `torch.load(weights_only=True)` and an explicit allow-list of the few
DeepSpeed types its ZeRO 0-3 state holds (`deepspeed_safe_globals`) before DeepSpeed sees it; a file
that needs anything else is refused (`UnsafeCheckpointError`) and nothing in it runs. Exported
weights are safetensors, which cannot execute code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from data_pipeline import fs
from data_pipeline.config import from_dict, to_yaml
from trainer import distributed as tdist
from trainer.engine import NonFiniteError, engine_device, local_params_finite, objective_engines

if TYPE_CHECKING:
    from trainer.config import TrainConfig

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


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that a weights-only load refuses: it would run code if unpickled."""


def deepspeed_safe_globals() -> list:
    """The non-torch types in DeepSpeed 0.19's checkpoint state, beyond torch's own weights-only
    set. Found by saving tiny ZeRO-0/1/2/3 checkpoints (fp32 and bf16, torch AdamW) and listing
    `torch.serialization.get_unsafe_globals_in_checkpoint`: the ZeRO optimizer state holds its
    stage enum, its loss scaler and (ZeRO-1/2) fragment addresses; the model state holds none.
    `DynamicLossScaler` is what fp16 runs hold in the same place. All are plain data classes."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_weights_only(path: str, name: str) -> None:
    """Load `path` with `torch.load(weights_only=True)` plus `deepspeed_safe_globals()`; raise
    UnsafeCheckpointError naming `name` if it needs anything else. Zip-format files are memory-
    mapped, so the check reads the pickle, not the tensor data."""
    import torch

    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        raise UnsafeCheckpointError(
            f"{name}: refusing to load: it needs more than tensors and the allowed DeepSpeed "
            f"types (would run code if unpickled): {reason[0] if reason else type(e).__name__}"
        ) from None
    except (
        RuntimeError,
        EOFError,
        IndexError,
        KeyError,
        ValueError,
        AttributeError,
        struct.error,
    ) as e:
        # A damaged file can fail inside the unpickler in many ways: all mean "unreadable", which
        # resume treats like any other bad checkpoint (it skips it), never as a crash.
        raise ValueError(f"{name}: not a readable torch file: {type(e).__name__}: {e}") from None


def download(ckpt: fs.Location, local_root: str, *, rank: int | None = None) -> dict:
    """Fetch a complete checkpoint to `local_root`, verifying every file's sha256, and every
    `.pt` file (DeepSpeed state) with a weights-only load (`check_weights_only`).

    With `rank`, other ranks' ZeRO shards are skipped (same world size on resume).
    Raises ValueError naming the file on any mismatch, UnsafeCheckpointError (a ValueError) on a
    file that a weights-only load refuses.
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
        if rel.endswith(".pt"):
            check_weights_only(dst, ckpt.join(rel).uri)
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


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """`safetensors.torch.save` with a canonical header: same tensors and metadata, same bytes.

    safetensors keeps `metadata` in a Rust HashMap, whose order is random per map, so two saves
    of identical weights differ in their header (and fingerprint) once there are two metadata
    keys. We rewrite the JSON header with sorted keys and no spaces, padded to 8 bytes as
    safetensors pads it; the tensor data and its offsets are untouched."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    canon = {}
    if "__metadata__" in header:
        canon["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    canon.update(sorted(header.items()))
    text = json.dumps(canon, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def save_safetensors(tensors: dict, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `safetensors_bytes(tensors, metadata)` to the local file `path`."""
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata))


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


class ResumeError(RuntimeError):
    """The checkpoint rank 0 chose cannot be loaded on every rank."""


def resume(engines: dict, run: fs.Location, rank: int, callbacks: list = ()) -> TrainState:
    """Load one checkpoint of `run` into every part's engine (model and optimizer state) and
    every callback's per-rank state; fresh state if there is none.

    Decided once: rank 0 picks the newest complete checkpoint that it can read
    (`pick_checkpoint`) and broadcasts its step; every rank loads that one. If any rank cannot,
    every rank stops with a `ResumeError` naming it: ranks never resume at different steps (a
    per-rank fallback to an older checkpoint would train them on different weights)."""
    local = staging_dir(f"load-r{rank}")
    try:
        step = pick_checkpoint(run, local) if rank == 0 else None
        step = tdist.broadcast_object(step)
        if step is None:
            return TrainState()
        loc = run.join("checkpoints", step_dir_name(step))
        error = ""
        if rank != 0:  # rank 0 already holds its files
            try:
                download(loc, local, rank=rank)
            except (ValueError, OSError) as e:
                error = f"rank {rank}: {e}"
        errors = [e for e in tdist.gather_objects(error) if e]
        if errors:
            raise ResumeError(
                f"cannot resume from {loc.uri} (step {step}), the newest complete checkpoint "
                f"rank 0 could read: {'; '.join(errors)}. No rank falls back to an older one; "
                f"fix the storage error, or delete that checkpoint directory, and run again"
            )
        state = load_staged(engines, local, loc, step, rank, callbacks)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    if rank == 0:
        print(f"[t2i] resumed from {loc.uri} (step {step})", flush=True)
    return state


def pick_checkpoint(run: fs.Location, local: str) -> int | None:
    """Rank 0's choice: the step of the newest complete checkpoint whose rank-0 files download
    and verify into `local` (left there), or None when there is none."""
    for step, loc in list_complete(run):
        try:
            download(loc, local, rank=0)
            return step
        except (ValueError, OSError) as e:
            print(f"[t2i] rank 0: skipping checkpoint {loc.uri}: {e}", flush=True)
            shutil.rmtree(local, ignore_errors=True)
            os.makedirs(local)
    return None


def load_staged(
    engines: dict, local: str, loc: fs.Location, step: int, rank: int, callbacks: list
) -> TrainState:
    """Restore a downloaded checkpoint (`local`, fetched from `loc`) into this rank."""
    from safetensors.torch import load_file

    for part, engine in engines.items():
        ds = os.path.join(local, ds_dir(part))
        if not os.path.isdir(os.path.join(ds, DS_TAG)):
            # DeepSpeed would only warn and train on from scratch.
            raise ValueError(
                f"{loc.uri}: no DeepSpeed state for part {part!r} ({ds_dir(part)}/): "
                f"this run's checkpoints were written by a different objective"
            )
        engine.load_checkpoint(
            ds, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    rng = os.path.join(local, f"rng_rank{rank:05d}.safetensors")
    if os.path.exists(rng):
        torch.set_rng_state(load_file(rng)["torch_cpu"])
    else:  # more ranks than when saved: a fresh stream that does not replay step 0's draws
        torch.manual_seed(torch.initial_seed() + 7919 * (step + 1))
    for cb in callbacks:
        path = os.path.join(local, callback_file(cb, rank))
        if not os.path.exists(path):
            raise ValueError(f"{loc.uri}: no {cb.name} state for rank {rank} ({path})")
        cb.load_state_dict(load_file(path), source=loc.uri)
    with open(os.path.join(local, "train_state.json")) as f:
        return from_dict(TrainState, json.load(f), source=loc.uri)


def callback_file(cb, rank: int) -> str:
    return f"{cb.name}_rank{rank:05d}.safetensors"


def save(
    engines: dict,
    cfg: TrainConfig,
    run: fs.Location,
    state: TrainState,
    rank: int,
    world: int,
    objective,
    callbacks: list = (),
    *,
    export: bool,
) -> None:
    """Every rank stages and uploads its files; rank 0 writes the manifest after all are done.
    Returns the Ray Checkpoint on rank 0, None elsewhere."""
    import ray.train
    from safetensors.torch import save_file

    finite = all(local_params_finite(e) for e in engines.values())
    if not tdist.all_ranks_true(finite, engine_device(engines)):
        raise NonFiniteError(f"refusing to checkpoint step {state.step}: parameters are not finite")
    dest = run.join("checkpoints", step_dir_name(state.step))
    local = staging_dir(f"save-r{rank}")
    for part, engine in engines.items():  # model + optimizer state of every part
        engine.save_checkpoint(os.path.join(local, ds_dir(part)), tag=DS_TAG, save_latest=False)
    save_file(
        {"torch_cpu": torch.get_rng_state()}, os.path.join(local, f"rng_rank{rank:05d}.safetensors")
    )
    for cb in callbacks:  # per-rank callback state (an EMA shard), restored by resume()
        save_file(cb.state_dict(), os.path.join(local, callback_file(cb, rank)))
    weights = (
        objective.export_state_dict(objective_engines(engines))
        if export and cfg.checkpoint.export_weights
        else None
    )
    if rank == 0:
        with open(os.path.join(local, "train_state.json"), "wb") as f:
            f.write(state_to_json(state))
        with open(os.path.join(local, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        if weights is not None:
            save_safetensors(  # fixed header order: same weights, same fingerprint
                weights,
                os.path.join(local, "model.safetensors"),
                metadata={"objective": cfg.objective, "step": str(state.step)},
            )
            write_export = getattr(objective, "write_export", None)
            if write_export is not None:  # an ecosystem layout beside it (diffusers folders)
                write_export(local, weights)
    files = upload_dir(local, dest)
    shutil.rmtree(local, ignore_errors=True)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, files)  # also the barrier: every upload is done
    if rank == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        write_manifest(dest, state.step, merged)
        prune(run, cfg.checkpoint.keep)
        print(f"[t2i] checkpoint step {state.step} -> {dest.uri} ({len(merged)} files)", flush=True)
    dist.barrier()
    return ray.train.Checkpoint(path=dest.path, filesystem=dest.fs) if rank == 0 else None
