"""The newest run of the log held in memory: a contiguous run of positions (start, end] of the whole,
unfiltered log, in a fixed-size ring, filled by the process's one tail (backend/store/tail.py).

Positions are gap-free and become visible strictly in order (docs/ARCHITECTURE.md, "Why readers
never skip"), and the tail hands over only what follows what it handed before; so a follower at
position p with start <= p <= end takes everything after p up to end from here and misses nothing.
A follower behind start reads the store itself. The SSE hub's window (backend/streaming/window.py)
and the projection runners' feed (projections/feed.py) are both such runs.
"""

from __future__ import annotations

import logging
from typing import Generic, TypeVar, cast

log = logging.getLogger(__name__)

T = TypeVar("T")


class LogRun(Generic[T]):
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._ring: list[T | None] = [None] * capacity
        self.start = 0
        """Positions after start are held (up to end); a follower at start or later reads from here."""
        self.end = 0

    def reset(self, position: int) -> None:
        """Forget everything: the run now starts (empty) at position."""
        self._ring = [None] * self.capacity
        self.start = self.end = position

    def covers(self, position: int) -> bool:
        return position >= self.start

    def put(self, position: int, item: T) -> int:
        """Hold the item of the next position; returns its slot. A position that does not follow end
        cannot come from a gap-free log: if it ever does, the run restarts so nobody reads across it."""
        if position != self.end + 1:
            log.warning("event positions are not contiguous, restarting the run of the newest log",
                        extra={"expected": self.end + 1, "got": position})
            self.reset(position - 1)
        slot = position % self.capacity
        self._ring[slot] = item
        self.end = position
        if position - self.start > self.capacity:
            self.start = position - self.capacity
        return slot

    def at(self, position: int) -> T:
        """The item held for a position in (start, end]."""
        return cast("T", self._ring[position % self.capacity])

    def after(self, position: int, limit: int) -> list[T]:
        """Up to limit items after position (which the run must cover), oldest first."""
        if position < self.start:
            raise ValueError(f"position {position} is behind the run (starts at {self.start})")
        first, last = position + 1, min(self.end, position + limit)
        if first > last:
            return []
        i, j = first % self.capacity, last % self.capacity
        ring = self._ring
        found = ring[i : j + 1] if i <= j else ring[i:] + ring[: j + 1]
        return cast("list[T]", found)  # every slot in (start, end] is filled
