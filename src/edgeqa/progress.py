"""Progress you can watch in the Prefect log: a long loop logs where it is (done / total, its own figures such
as the loss, elapsed time and an ETA) at most every `EVERY_S` seconds, and once at the end.

Log lines, not a terminal bar: a stage's output reaches the Prefect log line by line through `dvc repro`, where
a carriage-return progress bar would arrive only when the stage ends.
"""

from __future__ import annotations

import logging
import time
from typing import Any

EVERY_S = 20.0  # well inside the 30 s a watcher may wait for a sign of life


def _clock(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """`update(done, **figures)` after each unit of work; `what` and `unit` word the line, e.g.
    `label: 48/400 images (12 %), 3.1 images/s, elapsed 0m15s, ETA 1m53s`."""

    def __init__(self, log: logging.Logger, what: str, total: int, unit: str, every_s: float = EVERY_S):
        self.log, self.what, self.total, self.unit, self.every_s = log, what, max(0, int(total)), unit, every_s
        self.t0 = self.last = time.perf_counter()
        self.first_done: int | None = None

    def line(self, done: int, now: float, **figures: Any) -> str:
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.what}: {done}/{self.total} {self.unit}"
                 + (f" ({100 * done / self.total:.0f} %)" if self.total else "")]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
        parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_clock(elapsed)}")
        if 0 < done < self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - done) / rate)}")
        return ", ".join(parts)

    def update(self, done: int, **figures: Any) -> None:
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        self.log.info("%s", self.line(done, now, **figures))
