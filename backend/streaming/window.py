"""The shared window: the most recent events of the log as SSE items, read by every subscriber.

The window is a run of the newest log (backend.store.run.LogRun: a contiguous run (start, end] that
the process's one tail fills; a subscriber at position p with start <= p misses nothing by taking
what follows p from here, one behind ``start`` reads the store instead).

Each held event also links back to the previous held event of its stream, and the window knows each
stream's latest held event: a subscriber that follows one stream finds its events after p by walking
that chain, in steps proportional to its own events, however many other streams' events lie between.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, TypeAlias

from backend.store.events import RecordedEvent
from backend.store.run import LogRun
from backend.streaming import frames

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


class Window(LogRun[Item]):
    """The hub's run of the newest log (backend.store.run.LogRun), each event linked to its stream's."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._previous: list[int] = [0] * capacity
        """Per slot: the position of the previous event of the same stream (0: none known)."""
        self._latest: OrderedDict[str, int] = OrderedDict()
        """Stream id -> the position of its latest held event, least recently written first; streams with
        nothing held any more are dropped, so this stays as small as the window."""

    def reset(self, position: int) -> None:
        super().reset(position)
        self._previous = [0] * self.capacity
        self._latest.clear()

    def extend(self, items: Iterable[Item]) -> None:
        latest = self._latest  # a gap makes put() reset the window, links and all
        for item in items:
            position, start = item[POSITION], self.start
            slot = self.put(position, item)
            self._previous[slot] = latest.pop(item[STREAM], 0)
            latest[item[STREAM]] = position
            if self.start != start:
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
        previous = self._previous
        while at > floor:
            found.append(self.at(at))
            at = previous[at % self.capacity]
        found.reverse()
        return found[:limit]
