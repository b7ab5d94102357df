"""Fault injection for recovery drills (`faults:` in the config; all off by default), as a loop
callback (trainer/callbacks.py). Tests and chaos drills use it to kill workers at exact points:

    kill_at_steps              rank 1 (rank 0 alone) SIGKILLs itself right after each listed step
    kill_in_save_at_step       rank 0 SIGKILLs itself halfway through uploading that checkpoint
    flip_checkpoint_at_step    once that checkpoint is complete, rank 0 flips one byte of its
    delete_checkpoint_file_at_step   model-state file (or deletes it), then SIGKILLs itself
    pause_at_step              every rank waits after that step until `pause_until_file` exists
    nan_loss_at_steps          a NaN loss at each listed step, once per listing

Every kill and damage happens once: it first writes a marker file in `marker_dir`, and a
restarted attempt that finds the marker goes on. `consumption_log` (a local directory) gets one
JSON line per micro-batch and rank — the sample ids it consumed, toward which step, in which
epoch, in which attempt — and one line per resume, so a drill can prove every sample was
consumed exactly once per epoch across restarts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import torch

from data_pipeline import fs
from data_pipeline.columns import SAMPLE_ID
from trainer.callbacks import Callback
from trainer.checkpoint import step_dir_name

MODEL_STATE = "ds/state/mp_rank_00_model_states.pt"  # the file a damage drill hits


def check_faults(f) -> None:
    """A kill or damage needs `marker_dir`, or it would repeat in every restarted attempt. The
    driver runs this before any worker starts (trainer.launch), each worker again."""
    kills = (
        f.kill_at_steps,
        f.kill_in_save_at_step,
        f.flip_checkpoint_at_step,
        f.delete_checkpoint_file_at_step,
    )
    if any(kills) and not f.marker_dir:
        raise ValueError(
            "faults: a kill or damage is set but faults.marker_dir is empty: set it to a local "
            "directory every worker can write (it records each fault, so a restarted attempt "
            "does not repeat it)"
        )


class FaultInjector(Callback):
    name = "faults"

    def __init__(self, cfg, run: fs.Location | None = None):
        check_faults(cfg.faults)
        self.f = cfg.faults
        self.run = run
        self.rank, self.world = 0, 1
        self.nan_fired: Counter = Counter()

    # -- events ---------------------------------------------------------------------------------
    def on_engines(self, engines: dict, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def on_resume(self, state, skipped: list[str]) -> None:
        self._log({"event": "resume", "step": state.step, "skipped": skipped})

    def on_batch(self, batch: dict, state) -> None:
        if not self.f.consumption_log:
            return
        if SAMPLE_ID not in batch:
            raise ValueError(
                f"faults.consumption_log needs an {SAMPLE_ID!r} column in the training data "
                f"(data.source=synthetic has one); this dataset has {sorted(batch)}"
            )
        ids = batch[SAMPLE_ID].tolist()
        self._log({"event": "batch", "step": state.step + 1, "epoch": state.epoch, "ids": ids})

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if self.nan_fired[step] < self.f.nan_loss_at_steps.count(step):
            self.nan_fired[step] += 1
            return loss * float("nan")
        return loss

    def on_checkpoint_file(self, step: int, rank: int, done: int, total: int) -> None:
        if step == self.f.kill_in_save_at_step and rank == 0 and done == max(1, total // 2):
            self._kill(f"kill_in_save_{step}", f"rank 0 killed after {done}/{total} files")

    def on_step_done(self, step: int, checkpointed: bool) -> None:
        f = self.f
        if step in f.kill_at_steps and self.rank == min(1, self.world - 1):
            self._kill(f"kill_after_step_{step}", f"rank {self.rank} killed after step {step}")
        if self.rank == 0 and checkpointed:
            if step == f.flip_checkpoint_at_step:
                self._damage(step, "flip")
            if step == f.delete_checkpoint_file_at_step:
                self._damage(step, "delete")
        if f.pause_at_step and step == f.pause_at_step and f.pause_until_file:
            print(f"[t2i] paused after step {step} until {f.pause_until_file} exists", flush=True)
            while not os.path.exists(f.pause_until_file):
                time.sleep(0.2)

    # -- faults ---------------------------------------------------------------------------------
    def _damage(self, step: int, how: str) -> None:
        marker = f"{how}_checkpoint_{step}"
        if self._fired(marker):
            return
        target = self.run.join("checkpoints", step_dir_name(step), MODEL_STATE)
        if how == "flip":  # same size, other bytes: only the sha256 check can tell
            data = bytearray(fs.read_bytes(target))
            data[len(data) // 2] ^= 0xFF
            fs.write_bytes_atomic(target, bytes(data))
        else:
            target.fs.delete_file(target.path)
        self._kill(marker, f"rank 0 damaged ({how}) {target.uri}, then killed")

    def _fired(self, marker: str) -> bool:
        return os.path.exists(os.path.join(self.f.marker_dir, marker))

    def _kill(self, marker: str, what: str) -> None:
        if self._fired(marker):
            return
        os.makedirs(self.f.marker_dir, exist_ok=True)
        with open(os.path.join(self.f.marker_dir, marker), "w") as out:
            out.write(what + "\n")
        print(f"[t2i] fault injection: {what}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def _log(self, record: dict) -> None:
        if not self.f.consumption_log:
            return
        os.makedirs(self.f.consumption_log, exist_ok=True)
        path = os.path.join(self.f.consumption_log, f"rank{self.rank:05d}.jsonl")
        with open(path, "a") as out:  # flushed on close: a SIGKILL loses no finished line
            out.write(json.dumps({"attempt": os.getpid(), "rank": self.rank, **record}) + "\n")
