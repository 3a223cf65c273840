"""The shared window: the most recent events of the log, in a fixed-size ring, read by every subscriber.

The window always holds a contiguous run of positions (start, end] of the whole, unfiltered log. The
store's positions are gap-free and become visible strictly in order, and one tailing task appends to
the window only what it read after ``end``; so a subscriber at position p with start <= p can take
everything after p from here and miss nothing. A subscriber behind ``start`` reads the store instead.

Each held event also links back to the previous held event of its stream, and the window knows each
stream's latest held event: a subscriber that follows one stream finds its events after p by walking
that chain, in steps proportional to its own events, however many other streams' events lie between.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
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
STREAM: Final = 1
FRAME: Final = 4


def make_item(event: RecordedEvent, owner: str | None) -> Item:
    return (event.position, event.stream_id, event.type, owner, frames.event_frame(event))


class Window:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._ring: list[Item | None] = [None] * capacity
        self._previous: list[int] = [0] * capacity
        """Per slot: the position of the previous event of the same stream (0: none known)."""
        self._latest: OrderedDict[str, int] = OrderedDict()
        """Stream id -> the position of its latest held event, least recently written first; streams with
        nothing held any more are dropped, so this stays as small as the window."""
        self.start = 0
        """Positions after start are held (up to end); a subscriber at start or later reads from here."""
        self.end = 0

    def reset(self, position: int) -> None:
        """Forget everything: the window now starts (empty) at position."""
        self._ring = [None] * self.capacity
        self._previous = [0] * self.capacity
        self._latest.clear()
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
            stream = item[STREAM]
            latest = self._latest
            slot = position % self.capacity
            self._ring[slot] = item
            self._previous[slot] = latest.pop(stream, 0)
            latest[stream] = position
            self.end = position
            if self.end - self.start > self.capacity:
                self.start = self.end - self.capacity
                while latest and next(iter(latest.values())) <= self.start:
                    latest.popitem(last=False)

    def latest_of(self, stream: str) -> int:
        """The position of the stream's latest held event; at most ``start`` when none is held."""
        return self._latest.get(stream, 0)

    def after_in(self, stream: str, position: int, limit: int) -> list[Item]:
        """Up to limit of the stream's items after position (which the window must cover), oldest first;
        the cost follows the stream's own events in the window, not all of them."""
        if position < self.start:
            raise ValueError(f"position {position} is behind the window (starts at {self.start})")
        found: list[Item] = []
        at = self._latest.get(stream, 0)
        floor = max(position, self.start)
        ring, previous, capacity = self._ring, self._previous, self.capacity
        while at > floor:
            slot = at % capacity
            found.append(cast("Item", ring[slot]))
            at = previous[slot]
        found.reverse()
        return found[:limit]

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
