"""The shared window: the most recent events of the log, in a fixed-size ring, read by every subscriber.

The window always holds a contiguous run of positions (start, end] of the whole, unfiltered log. The
store's positions are gap-free and become visible strictly in order, and one tailing task appends to
the window only what it read after ``end``; so a subscriber at position p with start <= p can take
everything after p from here and miss nothing. A subscriber behind ``start`` reads the store instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final, TypeAlias, cast

from backend.store.events import RecordedEvent
from backend.streaming import frames

log = logging.getLogger(__name__)

Item: TypeAlias = tuple[int, str, str, "str | None", bytes]
"""One event as log streams use it: ``(position, stream_id, type, owner, frame)``, where owner is the
wallet's owner for the per-owner filter (None outside wallet streams) and frame the event's ready-to-write
``/v1/streams/events`` frame. A plain tuple of atomic values on purpose: CPython's cyclic collector stops
tracking such tuples, so the window's thousands of items, each living for seconds, never lengthen or
multiply the collector's full passes (which showed up as pauses in the delivery latency; see
docs/PERFORMANCE.md)."""

POSITION: Final = 0
FRAME: Final = 4


def make_item(event: RecordedEvent, owner: str | None) -> Item:
    return (event.position, event.stream_id, event.type, owner, frames.event_frame(event))


class Window:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._ring: list[Item | None] = [None] * capacity
        self.start = 0
        """Positions after start are held (up to end); a subscriber at start or later reads from here."""
        self.end = 0

    def reset(self, position: int) -> None:
        """Forget everything: the window now starts (empty) at position."""
        self._ring = [None] * self.capacity
        self.start = self.end = position

    def covers(self, position: int) -> bool:
        return position >= self.start

    def extend(self, items: Iterable[Item]) -> None:
        for item in items:
            position = item[POSITION]
            if position != self.end + 1:
                # Cannot happen with a gap-free store; if it ever does, nobody may read across the gap.
                log.warning("event positions are not contiguous, restarting the stream window",
                            extra={"expected": self.end + 1, "got": position})
                self.reset(position - 1)
            self._ring[position % self.capacity] = item
            self.end = position
            if self.end - self.start > self.capacity:
                self.start = self.end - self.capacity

    def after(self, position: int, limit: int) -> list[Item]:
        """Up to limit items after position (which the window must cover), oldest first."""
        if position < self.start:
            raise ValueError(f"position {position} is behind the window (starts at {self.start})")
        first, last = position + 1, min(self.end, position + limit)
        if first > last:
            return []
        i, j = first % self.capacity, last % self.capacity
        ring = self._ring
        found = ring[i : j + 1] if i <= j else ring[i:] + ring[: j + 1]
        return cast("list[Item]", found)  # every slot in (start, end] is filled
