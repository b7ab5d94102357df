"""Pure schedule functions (unit-tested; the loop only calls them)."""

from __future__ import annotations

import math


def compute_lr(
    step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> float:
    """Linear warmup from lr/warmup to `lr` over `warmup_steps`, then cosine to `min_lr_ratio*lr`.

    `step` counts optimizer steps from 0; the value is the LR used *for* that step.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
