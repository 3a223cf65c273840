"""Concurrent point reads of streams share one query.

At high concurrency every command starts by reading its stream (its version, or the events after a
cached copy). Issued one by one these reads cost a round trip each and dominate the database's work;
merged, one query answers all the reads queued when it starts. A read is only ever answered by a query
that started after the read was asked for, so it sees every write committed before it was asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

import asyncpg

from backend.store.events import RecordedEvent
from backend.store.hashing import GENESIS
from backend.store.reads import to_event

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

# Both reads also return the log's head as of their snapshot: see StreamReads. Each stream is read
# in a lateral subquery, so that every plan walks the (stream_id, version) index once per stream: as a
# plain join, the generic plan of a prepared statement (which asyncpg's cache ends up using) guessed ten
# streams and hashed them against a scan of the whole log, a cost that grew with every event appended.
# The subquery's `order by` keeps the planner from flattening it back into that join.
TAILS_SQL = """
select e.position, e.stream_id, e.version, e.type, e.data, e.metadata, e.event_id, e.recorded_at, e.hash,
       (select max(position) from events) as head
from unnest($1::text[], $2::int[]) with ordinality as s(sid, after, i)
cross join lateral (
    select * from events where events.stream_id = s.sid and events.version > s.after order by events.version
) as e
order by s.i, e.version
"""

VERSIONS_SQL = """
select s.sid, coalesce(e.version, 0) as version, e.hash, coalesce((select max(position) from events), 0) as head
from unnest($1::text[]) as s(sid)
left join lateral (
    select version, hash from events where events.stream_id = s.sid order by version desc limit 1
) as e on true
"""

HeadsSeen = Callable[[int, dict[str, tuple[int, bytes]]], None]
"""Told, after each read, the log's head as of the read and the heads (version, hash) of the streams read."""


class Coalescer(Generic[K, V]):
    """Queue keys while at most max_in_flight loads run; each load takes everything queued so far."""

    def __init__(self, load: Callable[[list[K]], Awaitable[dict[K, V]]], default: Callable[[], V],
                 max_in_flight: int = 2) -> None:
        self._load = load
        self._default = default
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self._pending: list[tuple[K, asyncio.Future[V]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.loads = 0

    async def get(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._pending.append((key, future))
        if self._in_flight < self._max_in_flight:
            # Load in this task (no hand-off when nothing else is going on); whatever queues up
            # meanwhile is loaded by a task of its own, so this caller is answered at once.
            self._in_flight += 1
            try:
                await self._load_pending()
            except BaseException:
                # Cancelled mid-load: the others' reads went back in the queue; this one's leaves it
                # (answered later, an error would sit in a future nobody awaits).
                future.cancel()
                self._pending = [(key, f) for key, f in self._pending if f is not future]
                raise
            finally:
                self._in_flight -= 1
                if self._pending and self._in_flight < self._max_in_flight:
                    self._in_flight += 1
                    task = asyncio.create_task(self._drain())
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                await self._load_pending()
        finally:
            self._in_flight -= 1

    async def _load_pending(self) -> None:
        batch, self._pending = self._pending, []
        keys = list(dict.fromkeys(key for key, _ in batch))
        self.loads += 1
        try:
            results = await self._load(keys)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            # The loading caller was cancelled: the others of its batch go back in the queue.
            self._pending[:0] = [(key, future) for key, future in batch if not future.done()]
            raise
        for key, future in batch:
            if not future.done():
                future.set_result(results[key] if key in results else self._default())


class StreamReads:
    """Coalesced `version(stream)` and `tail(stream, after_version)` reads.

    What a read learns of stream heads goes to `heads_seen` with the log head of its snapshot: the
    appender uses it to append to those streams on its one-round-trip path (backend/store/append.py)."""

    def __init__(self, pool: asyncpg.Pool, heads_seen: HeadsSeen | None = None) -> None:
        self._pool = pool
        self._heads_seen = heads_seen
        self._versions: Coalescer[str, int] = Coalescer(self._load_versions, int)
        self._tails: Coalescer[tuple[str, int], list[RecordedEvent]] = Coalescer(self._load_tails, list)

    @property
    def version_queries(self) -> int:
        return self._versions.loads

    @property
    def tail_queries(self) -> int:
        return self._tails.loads

    async def version(self, stream_id: str) -> int:
        return await self._versions.get(stream_id)

    async def tail(self, stream_id: str, after_version: int) -> list[RecordedEvent]:
        return list(await self._tails.get((stream_id, after_version)))

    async def _load_versions(self, streams: list[str]) -> dict[str, int]:
        rows = await self._pool.fetch(VERSIONS_SQL, streams)
        if self._heads_seen is not None and rows:
            self._heads_seen(rows[0]["head"], {
                row["sid"]: (row["version"], GENESIS if row["hash"] is None else bytes(row["hash"])) for row in rows
            })
        return {row["sid"]: row["version"] for row in rows}

    async def _load_tails(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], list[RecordedEvent]]:
        rows = await self._pool.fetch(TAILS_SQL, [k[0] for k in keys], [k[1] for k in keys])
        tails: dict[tuple[str, int], list[RecordedEvent]] = {}
        by_stream: dict[str, list[tuple[str, int]]] = {}
        for key in keys:
            by_stream.setdefault(key[0], []).append(key)
        seen: set[int] = set()
        for row in rows:
            if row["position"] in seen:  # a stream asked for twice comes back once per ask
                continue
            seen.add(row["position"])
            event = to_event(row)
            for key in by_stream[event.stream_id]:
                if event.version > key[1]:
                    tails.setdefault(key, []).append(event)
        for tail in tails.values():
            tail.sort(key=lambda event: event.version)
        if self._heads_seen is not None and rows:
            self._heads_seen(rows[0]["head"], {tail[-1].stream_id: (tail[-1].version, tail[-1].hash)
                                               for tail in tails.values()})
        return tails
