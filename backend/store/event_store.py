"""EventStore: the one object the rest of Tally appends through and reads from."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import asyncpg

from backend.store import reads
from backend.store.append import AppendBatcher
from backend.store.coalesce import StreamReads
from backend.store.events import AppendResult, NewEvent, RecordedEvent, Write
from backend.store.idempotency import IdempotencyClaim


class EventStore:
    def __init__(self, pool: asyncpg.Pool, *, max_batch_events: int = 2000, linger_s: float = 0.0) -> None:
        self.pool = pool
        self.batcher = AppendBatcher(pool, max_batch_events=max_batch_events, linger_s=linger_s)
        self.point_reads = StreamReads(pool, self.batcher.heads_seen)

    async def append(self, writes: Sequence[Write], claim: IdempotencyClaim | None = None) -> AppendResult:
        """Append every write atomically; the guarantees are in docs/ARCHITECTURE.md, "The append protocol"."""
        return await self.batcher.append(writes, claim)

    async def append_to(self, stream_id: str, expected_version: int, events: Sequence[NewEvent]) -> AppendResult:
        return await self.batcher.append([Write(stream_id, expected_version, events)])

    async def read_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> list[RecordedEvent]:
        return await reads.read_stream(self.pool, stream_id, after_version, to_version)

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = reads.DEFAULT_PAGE,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
    ) -> list[RecordedEvent]:
        return await reads.read_all(self.pool, after_position, limit, types, stream_prefix)

    def iter_all(
        self,
        after_position: int = 0,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
        page_size: int = reads.DEFAULT_PAGE,
        to_position: int | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        return reads.iter_all(self.pool, after_position, types, stream_prefix, page_size, to_position)

    def iter_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> AsyncIterator[RecordedEvent]:
        return reads.iter_stream(self.pool, stream_id, after_version, to_version)

    async def head(self) -> int:
        return await reads.head(self.pool)

    async def stream_version(self, stream_id: str) -> int:
        """The stream's current version (0 if it does not exist); concurrent calls share one query."""
        return await self.point_reads.version(stream_id)

    async def read_tail(self, stream_id: str, after_version: int) -> list[RecordedEvent]:
        """The stream's events after after_version; concurrent calls share one query."""
        return await self.point_reads.tail(stream_id, after_version)

    async def close(self) -> None:
        await self.batcher.close()
