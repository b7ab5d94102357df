"""Checkpoints that are complete or ignored: the storage layout, and the loop's `save`/`resume`.

Layout (local dir or s3://), one directory per step:

    <storage_path>/<run>/checkpoints/step_00000100/
        ds/state/...                DeepSpeed engine state (every rank's ZeRO shards): model
                                    weights + optimizer of the part "model"
        ds_<part>/state/...         the same for each extra part (a GAN's discriminator)
        rng_rank00000.safetensors   each rank's torch RNG state (CPU + its device's generator)
        train_state.json            step, data position (epoch, batches consumed), counters
        config.yaml                 the resolved TrainConfig
        model.safetensors           consolidated weights (final checkpoint, when exported)
        manifest.json               WRITTEN LAST: size + sha256 of every file above

A directory without a valid manifest, or whose files do not match it, is not a checkpoint: the
loader skips it and says why (a crash mid-save leaves exactly that). We never trust DeepSpeed's
`latest` file, which it writes before its final barrier. Every rank stages its own files on local
disk, uploads them, and reports their checksums to rank 0, which writes the manifest once all
uploads are done. A save first removes whatever an earlier attempt left at that step.

Resume is decided once, by all ranks alike (`resume`): rank 0 lists the step directories, every
rank downloads and verifies its own files of the newest complete one, and the ranks exchange
verdicts. A damaged checkpoint (a sha256 mismatch, a file deleted, a refused pickle) is skipped by
every rank, named, and the previous one tried; a storage error stops every rank with an error
naming it. Ranks never resume at different steps.

DeepSpeed 0.19 unpickles its engine state (`torch.load(weights_only=False)`), and the manifest
sits in the same bucket, so its sha256 catches corruption, not a planted file: `download` checks
every `.pt` file with a weights-only load first (trainer/safe_files.py). Exported weights are
safetensors, which cannot execute code.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
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
from trainer.pretrained.runs import (  # noqa: F401  (the read side of the layout, re-exported)
    FORMAT,
    STEP_RE,
    VERSION,
    check_complete,
    find_exported,
    list_complete,
    list_steps,
    read_manifest,
)
from trainer.safe_files import check_weights_only, save_safetensors

if TYPE_CHECKING:
    from trainer.config import TrainConfig

DS_TAG = "state"
_STEP_RE = STEP_RE
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
    on_file: Callable[[int, int], None] | None = None,
) -> dict[str, dict]:
    """Copy every file under `local_root` to `dest`; return {relpath: {bytes, sha256}}.

    Files of any size go straight to their final names (`fs.upload_file`: multipart on S3, no
    5 GiB server-side-copy ceiling); each appears only once complete, and the checkpoint only once
    the manifest is written after all of them. `part_bytes` overrides the configured part size;
    `on_part(relpath, parts_done, parts_total)` reports progress of multipart uploads,
    `on_file(files_done, files_total)` each finished file.
    """
    entries = {}
    rels = local_files(local_root)
    for i, rel in enumerate(rels):
        src = os.path.join(local_root, rel)
        size, digest = fs.file_digest(src)
        progress = None if on_part is None else functools.partial(on_part, rel)
        fs.upload_file(src, dest.join(rel), part_bytes=part_bytes, on_part=progress)
        entries[rel] = {"bytes": size, "sha256": digest}
        if on_file is not None:
            on_file(i + 1, len(rels))
    return entries


def write_manifest(dest: fs.Location, step: int, files: dict[str, dict]) -> None:
    doc = {"format": FORMAT, "version": VERSION, "step": step, "files": dict(sorted(files.items()))}
    fs.write_bytes_atomic(dest.join("manifest.json"), json.dumps(doc, indent=2).encode())


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
        if fs.download_file(ckpt.join(rel), dst) != meta["sha256"]:
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


def staging_dir(prefix: str) -> str:
    return tempfile.mkdtemp(prefix=f"t2i-{prefix}-")


def state_to_json(state: TrainState) -> bytes:
    return json.dumps(asdict(state), indent=2).encode()


class ResumeError(RuntimeError):
    """The checkpoint the ranks chose cannot be read on some rank (a storage error)."""


def resume(engines: dict, run: fs.Location, rank: int, callbacks: list = ()) -> TrainState:
    """Load one checkpoint of `run` into every part's engine (model and optimizer state) and
    every stateful callback's per-rank state; fresh state if there is none. Then every callback's
    `on_resume(state, skipped)`.

    Decided once, by all ranks alike (`choose_checkpoint`): the newest checkpoint that every rank
    can read. A damaged one is skipped by every rank and named; a storage error on a rank other
    than 0 stops every rank with a `ResumeError` naming the checkpoint: ranks never resume at
    different steps (a per-rank fallback would train them on different weights)."""
    local = staging_dir(f"load-r{rank}")
    try:
        step, skipped = choose_checkpoint(run, local, rank)
        for why in skipped if rank == 0 else ():
            print(f"[t2i] skipping checkpoint {why}", flush=True)
        state = TrainState()
        if step is not None:
            loc = run.join("checkpoints", step_dir_name(step))
            state = load_staged(engines, local, loc, step, rank, callbacks)
            if rank == 0:
                print(f"[t2i] resumed from {loc.uri} (step {step})", flush=True)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    for cb in callbacks:
        cb.on_resume(state, skipped)
    return state


def choose_checkpoint(run: fs.Location, local: str, rank: int) -> tuple[int | None, list[str]]:
    """(step, skipped): the newest checkpoint whose files this rank and every other rank
    downloaded and verified (this rank's are left in `local`), or None; and "uri: why" of each
    newer step directory passed over. A collective: every rank calls it and gets the same answer.

    Rank 0 lists the step directories once. An incomplete one (no manifest, a file missing or
    of the wrong size) is skipped; for a complete one every rank fetches its own files and the
    ranks exchange verdicts: all good -> chosen; damaged on any rank (sha256 mismatch, a file a
    weights-only load refuses or cannot read) or unreadable on rank 0 -> skipped by all; a
    storage error on another rank -> ResumeError on every rank.
    """
    steps = [s for s, _ in list_steps(run)] if rank == 0 else None
    skipped: list[str] = []
    for step in tdist.broadcast_object(steps):  # newest first; stops at the first good one
        loc = run.join("checkpoints", step_dir_name(step))
        incomplete = tdist.broadcast_object(check_complete(loc)[1] if rank == 0 else None)
        if incomplete:
            skipped.append(f"{loc.uri}: {incomplete}")
            continue
        verdict = ("ok", "")
        try:
            download(loc, local, rank=rank)
        except (ValueError, FileNotFoundError) as e:  # the files are not what was committed
            verdict = ("damaged", f"rank {rank}: {e}")
        except OSError as e:  # rank 0 picks what it can read; another rank's error stops all
            verdict = ("damaged" if rank == 0 else "storage", f"rank {rank}: {e}")
        verdicts = tdist.gather_objects(verdict)
        errors = [why for kind, why in verdicts if kind == "storage"]
        if errors:
            raise ResumeError(
                f"cannot resume from {loc.uri} (step {step}), the newest complete checkpoint: "
                f"{'; '.join(errors)}. No rank falls back to an older one on a storage error; "
                f"fix it, or delete that checkpoint directory, and run again"
            )
        damaged = [why for kind, why in verdicts if kind == "damaged"]
        if not damaged:
            return step, skipped
        skipped.append(f"{loc.uri}: damaged: {'; '.join(damaged)}")
        shutil.rmtree(local, ignore_errors=True)
        os.makedirs(local)
    return None, skipped


def pick_checkpoint(run: fs.Location, local: str) -> int | None:
    """`choose_checkpoint` for one process (tools, tests): the step, or None."""
    return choose_checkpoint(run, local, 0)[0]


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
    restore_rng(load_file(rng) if os.path.exists(rng) else {}, step)
    for cb in (cb for cb in callbacks if cb.stateful):
        path = os.path.join(local, callback_file(cb, rank))
        if not os.path.exists(path):
            raise ValueError(f"{loc.uri}: no {cb.name} state for rank {rank} ({path})")
        cb.load_state_dict(load_file(path), source=loc.uri)
    with open(os.path.join(local, "train_state.json")) as f:
        return from_dict(TrainState, json.load(f), source=loc.uri)


# Accelerators whose generators a checkpoint carries, when this process has initialised them.
RNG_DEVICES = ("cuda", "xpu")


def device_rng_modules() -> list[tuple[str, object]]:
    """(name, torch module) of every accelerator this process has initialised (a GPU rank's
    `torch.cuda`): their generators are what dropout, Gumbel noise and `randn_like` draw from
    on that device. A CPU rank (its GPUs hidden, CUDA never initialised) has none."""
    out = []
    for name in RNG_DEVICES:
        mod = getattr(torch, name, None)
        if mod is not None and mod.is_available() and mod.is_initialized():
            out.append((name, mod))
    return out


def rng_state() -> dict[str, torch.Tensor]:
    """This rank's random state: the CPU generator (`torch_cpu`) and each initialised device
    generator (`torch_cuda_0`, ... one per visible device: a Ray GPU worker sees one)."""
    out = {"torch_cpu": torch.get_rng_state()}
    for name, mod in device_rng_modules():
        for i, state in enumerate(mod.get_rng_state_all()):
            out[f"torch_{name}_{i}"] = state
    return out


def restore_rng(saved: dict[str, torch.Tensor], step: int) -> None:
    """Put back what `rng_state` saved: the next draws on the CPU and on each device are the ones
    the uninterrupted run made. What the checkpoint lacks (more ranks than when saved; a device
    generator a CPU-only run never used) gets a fresh stream that does not replay step 0's."""
    fresh = torch.initial_seed() + 7919 * (step + 1)
    if "torch_cpu" in saved:
        torch.set_rng_state(saved["torch_cpu"])
    else:
        torch.manual_seed(fresh)  # seeds the device generators too
        return
    for name, mod in device_rng_modules():
        states = [saved.get(f"torch_{name}_{i}") for i in range(mod.device_count())]
        if all(st is not None for st in states):
            mod.set_rng_state_all(states)
        else:
            mod.manual_seed_all(fresh)


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
    if rank == 0 and fs.exists(dest):  # what an earlier attempt left here: never mixed in
        dest.fs.delete_dir(dest.path)
    dist.barrier()
    local = staging_dir(f"save-r{rank}")
    for part, engine in engines.items():  # model + optimizer state of every part
        engine.save_checkpoint(os.path.join(local, ds_dir(part)), tag=DS_TAG, save_latest=False)
    save_file(rng_state(), os.path.join(local, f"rng_rank{rank:05d}.safetensors"))
    for cb in (cb for cb in callbacks if cb.stateful):  # per-rank state (an EMA shard)
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

    def on_file(done: int, total: int) -> None:
        for cb in callbacks:
            cb.on_checkpoint_file(state.step, rank, done, total)

    files = upload_dir(local, dest, on_file=on_file)
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
