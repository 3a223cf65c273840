"""A progress bar on stderr: done/total, events/s and ETA. Redrawn in place on a terminal; elsewhere
(logs, CI) one line every few seconds."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.total = max(total, 0)
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else 2.0
        self.started = time.monotonic()
        self._drawn = 0.0
        self.done = 0

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = max(total, done)
        now = time.monotonic()
        if now - self._drawn >= self.interval:
            self._drawn = now
            self._draw(now)

    def finish(self) -> None:
        self._draw(time.monotonic())
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        total = max(self.total, self.done, 1)
        filled = int(self.width * self.done / total)
        eta = (total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{eta:5.1f}s" if eta != float("inf") else "    ?"
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done:,}/{total:,} events "
                f"{rate:,.0f} ev/s ETA {eta_text}")
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        self.stream.flush()
