"""The driver-side progress line: quiet off a terminal, always a final line, rate and ETA."""

from __future__ import annotations

import io

from trainer.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_output_is_throttled_and_ends_with_the_total():
    out = io.StringIO()
    p = Progress("sample", 10, "candidates", every_s=3600, out=out)
    for _ in range(10):
        p.update(1, loss=0.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # nothing until the end, then one line
    assert lines[0].startswith("sample: 10/10 candidates [") and "ETA 0s" in lines[0]
    assert lines[0].endswith("loss=0.5")


def test_terminal_output_redraws_one_line():
    out = Tty()
    p = Progress("train", 3, "steps", out=out)
    for _ in range(3):
        p.update()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and text.count("\n") == 1
    assert "train: 2/3 steps" in text
