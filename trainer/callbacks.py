"""Loop callbacks: small objects the training loop calls at fixed events, in the spirit of
composer's events. The loop itself only trains; what watches or perturbs it lives here.

    on_engines(engines, rank, world)   engines built, before any resume
    on_resume(state, skipped)          after resume (`skipped`: "uri: why" of checkpoints passed
                                       over, the same list on every rank)
    on_batch(batch, state)             a micro-batch was taken from the data shard
    on_loss(loss, step) -> loss        the first part's loss, before the finiteness guard
    on_step_end(engines, step)         an optimizer step was applied (before its checkpoint)
    on_checkpoint_file(step, rank, n, total)   this rank uploaded n of its total checkpoint files
    on_step_done(step, checkpointed)   the step is reported (and checkpointed, when it says so)

A callback with state (`stateful = True`, a `name`, `state_dict()` / `load_state_dict()`) has it
saved per rank in every checkpoint and restored on resume (trainer/checkpoint.py): the EMA of
the weights (trainer/ema.py), the VQGAN's code-usage counters. Fault injection for recovery
drills is trainer/faults.py; the non-finite guard is `NonFiniteGuard` below.
"""

from __future__ import annotations

import torch

from trainer import distributed as tdist
from trainer.engine import NonFiniteError


class Callback:
    """Every event is a no-op here; subclasses override what they watch."""

    name = "callback"
    stateful = False

    def on_engines(self, engines: dict, rank: int, world: int) -> None:
        pass

    def on_resume(self, state, skipped: list[str]) -> None:
        pass

    def on_batch(self, batch: dict, state) -> None:
        pass

    def on_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        return loss

    def on_step_end(self, engines: dict, step: int) -> None:
        pass

    def on_checkpoint_file(self, step: int, rank: int, done: int, total: int) -> None:
        pass

    def on_step_done(self, step: int, checkpointed: bool) -> None:
        pass


class NonFiniteGuard:
    """Skips a micro-step on every rank together when any rank's loss is not finite, or when
    DeepSpeed skipped the optimizer step (non-finite gradients under bf16/fp16); stops the run
    after `max_bad` such steps in a row (fp16 loss-scale overflows are not counted: see
    `step_applied`). Skipping on one rank alone would desync the collectives.
    The flag is reduced on the engine's device (NCCL takes CUDA tensors only)."""

    def __init__(self, max_bad: int, device: torch.device):
        self.max_bad, self.device = max_bad, device
        self.in_a_row = 0
        self.skip_reason = ""  # why `step_applied` last said no

    def losses_ok(self, losses: dict[str, torch.Tensor]) -> bool:
        flat = torch.stack([v.detach().float() for v in losses.values()])
        return self._judge(tdist.all_ranks_finite(flat, self.device))

    def step_applied(self, engines: dict, active: list[str]) -> bool:
        """Whether every active part's optimizer step was applied. An fp16 engine with a dynamic
        loss scale skips steps whose gradients overflow as normal operation (the scale starts
        at 2^16 and halves on each overflow, so the first steps of a run skip): such a skip is
        not a bad step. DeepSpeed itself stops the run when the scale reaches its minimum."""
        skipped = [p for p in active if not engines[p].was_step_applied()]
        if skipped and all(_loss_scaled(engines[p]) for p in skipped):
            self.skip_reason = "fp16 loss-scale overflow"
            return False
        self.skip_reason = "non-finite gradients"
        return self._judge(not skipped)

    def _judge(self, ok: bool) -> bool:
        if ok:
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.max_bad:
            raise NonFiniteError(
                f"{self.in_a_row} consecutive non-finite steps (engine.max_bad_steps="
                f"{self.max_bad}): lower optimizer.lr, check the data, or use bf16/fp32"
            )
        return False

    def step_done(self) -> None:
        self.in_a_row = 0


def _loss_scaled(engine) -> bool:
    """An fp16 engine with a dynamic loss scale: its skipped steps are loss-scale overflows."""
    return bool(engine.fp16_enabled() and engine.dynamic_loss_scale())
