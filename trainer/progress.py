"""A driver-side progress line: done/total, rate, ETA (and any extra fields).

On a terminal it redraws one line; elsewhere (CI, `ray job logs`, files) it prints a plain line
at most every `every_s` seconds and at the end, so logs stay short.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, desc: str, total: int, unit: str = "", *, every_s: float = 10.0, out=None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.out = out or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self.t0 = self.last = time.monotonic()
        self.done = self.start = 0  # start: work done before this process (a resumed run)

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        now = time.monotonic()
        final = self.done >= self.total
        if not (self.tty or final or now - self.last >= self.every_s):
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        line = (f"{self.desc}: {self.done}/{self.total} {self.unit} "
                f"[{elapsed:.0f}s, {rate:.2f}/s, ETA {eta:.0f}s]{extra}")  # fmt: skip
        if self.tty:
            self.out.write("\r" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()
