"""EventStore: the one object the rest of Tally appends through and reads from.

Closed: its pool and its append batcher are private. Callers append, stage appends (the repository),
read, look up a stored Idempotency-Key outcome, and read its counters; snapshots have their own store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import NamedTuple

import asyncpg

from backend.store import idempotency, reads
from backend.store.append import AppendBatcher
from backend.store.coalesce import StreamReads
from backend.store.events import AppendResult, NewEvent, RecordedEvent, Write
from backend.store.idempotency import IdempotencyClaim, StoredOutcome
from backend.store.planner import AppendRequest
from backend.store.snapshots import SnapshotStore


class StoreCounters(NamedTuple):
    """Monotonic counts since the store was made (for /metrics, benchmarks and tests)."""

    batches: int
    """Append transactions committed."""
    batched_requests: int
    """Append calls those transactions carried."""
    fenced: int
    """Batches committed on the one-round-trip fenced path."""
    fence_misses: int
    """Fenced attempts that found one of their streams (or the time) moved by another writer."""
    fenced_shifted: int
    """Fenced batches that went in further on than planned: the log had moved, their streams had not."""
    version_queries: int
    """Queries that answered coalesced stream_version calls."""
    tail_queries: int
    """Queries that answered coalesced read_tail calls."""
    locked_paths: dict[str, int]
    """Batches that took the locked path, by reason (backend.store.append.LOCKED_REASONS)."""


class EventStore:
    def __init__(self, pool: asyncpg.Pool, *, max_batch_events: int = 2000, linger_s: float = 0.0) -> None:
        self._pool = pool
        self._batcher = AppendBatcher(pool, max_batch_events=max_batch_events, linger_s=linger_s)
        self._point_reads = StreamReads(pool, self._batcher.heads_seen)
        self.snapshots = SnapshotStore(pool)
        # The repository's path to the batcher, once per command each: bound here, not wrapped, so the
        # closed store costs no extra call (AppendBatcher documents them).
        self.submit = self._batcher.submit
        """Queue an append without waiting for it (`outcome` waits): AppendBatcher.submit."""
        self.outcome = self._batcher.wait
        """The result of a submitted append (or its exception): AppendBatcher.wait."""
        self.knows = self._batcher.knows
        """This process last saw the stream at this version and saw no foreign append since."""

    async def append(self, writes: Sequence[Write], claim: IdempotencyClaim | None = None) -> AppendResult:
        """Append every write atomically; the guarantees are in docs/ARCHITECTURE.md, "The append protocol"."""
        return await self._batcher.append(writes, claim)

    async def append_to(self, stream_id: str, expected_version: int, events: Sequence[NewEvent]) -> AppendResult:
        return await self._batcher.append([Write(stream_id, expected_version, events)])

    async def settled(self, request: AppendRequest) -> None:
        """Until a submitted append has settled, whatever its outcome."""
        await self._batcher.settled(request)

    async def stored_outcome(self, scope: str, key: str) -> StoredOutcome | None:
        """The outcome recorded for an Idempotency-Key, if any."""
        return await idempotency.lookup(self._pool, scope, key)

    def follow(self, events: Sequence[RecordedEvent], end: int) -> bool:
        """Every process's appends, in order, from the process's log tail (one contiguous page up to end):
        the known stream heads move on with them, so the fenced path need not forget them when another
        process appended (backend.store.planner.KnownHeads.follow). Whether they did."""
        return self._batcher.follow(events, end)

    def counters(self) -> StoreCounters:
        """The store's counters, all of them: the one way to read them."""
        return StoreCounters(self._batcher.batches, self._batcher.batched_requests, self._batcher.fenced,
                             self._batcher.fence_misses, self._batcher.shifted, self._point_reads.version_queries,
                             self._point_reads.tail_queries, dict(self._batcher.locked))

    def observe_batches(self, observe: Callable[[float, int], None] | None) -> None:
        """Call `observe` with each committed batch's seconds, from taking it to its commit, and the
        number of append calls it carried."""
        self._batcher.on_batch_done = observe

    async def read_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> list[RecordedEvent]:
        return await reads.read_stream(self._pool, stream_id, after_version, to_version)

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = reads.DEFAULT_PAGE,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
    ) -> list[RecordedEvent]:
        return await reads.read_all(self._pool, after_position, limit, types, stream_prefix)

    def iter_all(
        self,
        after_position: int = 0,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
        page_size: int = reads.DEFAULT_PAGE,
        to_position: int | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        return reads.iter_all(self._pool, after_position, types, stream_prefix, page_size, to_position)

    def iter_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> AsyncIterator[RecordedEvent]:
        return reads.iter_stream(self._pool, stream_id, after_version, to_version)

    async def head(self) -> int:
        return await reads.head(self._pool)

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (0 if it does not exist); concurrent calls share one query."""
        return await self._point_reads.version(stream_id)

    async def read_tail(self, stream_id: str, after_version: int) -> list[RecordedEvent]:
        """The stream's events after after_version; concurrent calls share one query."""
        return await self._point_reads.tail(stream_id, after_version)

    async def close(self) -> None:
        await self._batcher.close()
