"""Dashboard stats: one shared, rate-limited feed of the stats read model for every dashboard stream.

The feed asks a ``StatsSource`` for ``(stats, position)`` whenever the log moves (and, while the read
model lags the log, until it catches up), at most once per interval. It learns that the log moved as a
subscriber of the process's one log tail (backend/store/tail.py) that wants no event type: it is only
told how far the log was examined, from the pages read for the others, at no read of its own. It remembers at which
position each entry last changed, an entry being a key of a section (``stats["currencies"]["USD"]``,
``stats["events"]["WalletCredited"]``) or a top-level value that is not a dict; a subscriber that last
sent position p then sends only the entries changed after p, in the same shape, whatever it missed in
between. A client merges each section of a delta into its copy of the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from backend.clock import SYSTEM_CLOCK, Clock
from backend.store.events import RecordedEvent
from backend.store.tail import LogTail
from projections.stats import get_stats

Stats = dict[str, Any]
StatsSource = Callable[[], Awaitable[tuple[Stats, int]]]
"""Returns the stats read model and the log position it reflects (read together, consistently)."""

IDLE_RECHECK_S = 5.0


class StatsFeed:
    def __init__(self, source: StatsSource, tail: LogTail | None, interval_s: float,
                 on_change: Callable[[], None]) -> None:
        self._source = source
        self._tail = tail
        self._subscription = None if tail is None else tail.subscribe("dashboard-stats", self._receive, frozenset())
        self._log_end = 0
        """The log tail examined the log up to here."""
        self._moved = asyncio.Event()
        self.interval_s = interval_s
        self._on_change = on_change
        self.stats: Stats = {}
        self.position = -1
        """-1 until the first read: dashboard streams wait for ``ready`` before they start."""
        self._changed_at: dict[tuple[str, str | None], int] = {}
        self.ready = asyncio.Event()
        self.active = asyncio.Event()
        """Set while someone watches: nobody watching, nobody reads."""

    def delta_since(self, position: int) -> Stats:
        delta: Stats = {}
        for (section, key), at in self._changed_at.items():
            if at <= position:
                continue
            if key is None:
                delta[section] = self.stats[section]
            else:
                delta.setdefault(section, {})[key] = self.stats[section][key]
        return delta

    def _update(self, stats: Stats, position: int) -> None:
        if position <= self.position:  # nothing new (or a read model being rebuilt: ids never go back)
            return
        for section, value in stats.items():
            before = self.stats.get(section)
            if isinstance(value, dict):
                known = before if isinstance(before, dict) else {}
                for key, entry in value.items():
                    if known.get(key) != entry:
                        self._changed_at[(section, key)] = position
            elif before != value:
                self._changed_at[(section, None)] = position
        self.stats, self.position = stats, position
        self.ready.set()
        self._on_change()

    async def _receive(self, after: int, events: list[RecordedEvent], end: int) -> None:
        self._moved_to(end)

    def _moved_to(self, end: int) -> None:
        if end > self._log_end:
            self._log_end = end
            moved, self._moved = self._moved, asyncio.Event()
            moved.set()

    def _want(self, wanting: bool) -> None:
        if self._tail is not None and self._subscription is not None:
            self._moved_to(self._tail.want(self._subscription, wanting))

    def close(self) -> None:
        subscription, self._subscription = self._subscription, None
        if self._tail is not None and subscription is not None:
            self._tail.unsubscribe(subscription)

    async def _wait_beyond(self, position: int, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._log_end <= position:
                    await self._moved.wait()

    async def run(self) -> None:
        """Until cancelled (a failed read ends the run: the Hub's Supervisor starts another)."""
        try:
            while True:
                if not self.active.is_set():
                    self._want(False)  # nobody watching: the tail need not tell it anything
                    await self.active.wait()
                self._want(True)
                stats, position = await self._source()
                self._update(stats, position)
                await asyncio.sleep(self.interval_s)  # at most one read, hence one frame, per interval
                if self.position >= self._log_end:  # caught up: wait for the log to move
                    await self._wait_beyond(self.position, IDLE_RECHECK_S)
        finally:
            self._want(False)


def projection_stats(db: asyncpg.Pool, clock: Clock = SYSTEM_CLOCK) -> StatsSource:
    """The stats read model (projections/stats.py) and its checkpoint, read in one snapshot, as of clock's now."""

    async def read() -> tuple[Stats, int]:
        async with db.acquire() as conn:
            checkpoint, stats = await get_stats(conn, clock.now())
        return stats, checkpoint

    return read
