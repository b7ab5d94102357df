import math

import pytest

from trainer.schedules import compute_lr


def test_warmup_then_cosine_to_floor():
    kw = dict(lr=1.0, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = [compute_lr(s, **kw) for s in range(16)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)  # decay starts at the peak
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)  # floor, not below
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def test_no_warmup():
    assert compute_lr(0, lr=2.0, warmup_steps=0, total_steps=10, min_lr_ratio=0.0) == 2.0
