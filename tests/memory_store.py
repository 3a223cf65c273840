"""An event store in memory, for tests only: the command handlers and the bus run over it without a
database (tests/unit), and it passes the same contract tests as the PostgreSQL store
(tests/integration/store/test_store_contract.py).

Appends go through the production pieces that decide them: `encode_writes` validates and encodes, and
`BatchPlanner` plans each batch (expected versions, replays by event id, idempotency claims, the
`after` chain, positions and the hash chain). What this store adds is only the holding: appends
submitted in one turn of the event loop settle together on the next, in the order submitted, as one
batch (as the batcher merges concurrent appends), and the log is a list indexed by position."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

import orjson

from backend.store.encoding import encode_writes
from backend.store.event_store import StoreCounters
from backend.store.events import AppendResult, NewEvent, RecordedEvent, StoreError, Write
from backend.store.hashing import GENESIS
from backend.store.idempotency import IdempotencyClaim, StoredOutcome
from backend.store.planner import AppendRequest, BatchPlanner, Planned

log = logging.getLogger(__name__)

PAGE = 1000


class MemorySnapshots:
    def __init__(self) -> None:
        self._saved: dict[str, dict[int, str]] = {}

    async def latest(self, stream_id: str) -> tuple[int, dict[str, Any]] | None:
        saved = self._saved.get(stream_id)
        if not saved:
            return None
        version = max(saved)
        state: dict[str, Any] = orjson.loads(saved[version])  # a fresh copy each time, as from the table
        return version, state

    async def save(self, stream_id: str, version: int, type_name: str, payload_json: str) -> None:
        self._saved.setdefault(stream_id, {}).setdefault(version, payload_json)


class MemoryEventStore:
    """Implements backend.store.interface.EventLog; see the module docstring."""

    def __init__(self) -> None:
        self.snapshots = MemorySnapshots()
        self._log: list[RecordedEvent] = []
        """The event at position p is self._log[p - 1]: positions are gap-free from 1."""
        self._streams: dict[str, list[RecordedEvent]] = {}
        self._heads: dict[str, tuple[int, bytes]] = {}
        self._event_ids: dict[uuid.UUID, tuple[int, str, int, str, bytes]] = {}
        self._claims: dict[tuple[str, str], StoredOutcome] = {}
        self._last_recorded_at: datetime | None = None
        self._queue: list[AppendRequest] = []
        self._closing = False
        self.batches = 0
        self.batched_requests = 0

    # ---------------------------------------------------------------- appending

    async def append(self, writes: Sequence[Write], claim: IdempotencyClaim | None = None) -> AppendResult:
        return await self.outcome(self.submit(writes, claim))

    async def append_to(self, stream_id: str, expected_version: int, events: Sequence[NewEvent]) -> AppendResult:
        return await self.append([Write(stream_id, expected_version, events)])

    def submit(
        self,
        writes: Sequence[Write],
        claim: IdempotencyClaim | None = None,
        *,
        after: Sequence[AppendRequest] = (),
        on_settle: Callable[[AppendRequest], None] | None = None,
        fresh: bool = False,
    ) -> AppendRequest:
        encoded, count, size = encode_writes(writes, allow_empty=claim is not None)
        if self._closing:
            raise StoreError("the event store is shutting down")
        loop = asyncio.get_running_loop()
        request = AppendRequest(encoded, count, size, claim, loop.create_future(), tuple(after), on_settle=on_settle,
                                fresh=fresh)
        self._queue.append(request)
        if len(self._queue) == 1:  # the first of this turn's batch: settle the batch on the next turn
            loop.call_soon(self._settle_batch)
        return request

    async def outcome(self, request: AppendRequest) -> AppendResult:
        return await request.future

    @staticmethod
    async def settled(request: AppendRequest) -> None:
        if request.outcome is None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            request.waiters.append(waiter)
            await waiter

    def knows(self, stream_id: str, version: int) -> bool:
        """Exact: no other process appends to this store."""
        return self._heads.get(stream_id, (0, GENESIS))[0] == version

    def follow(self, events: Sequence[RecordedEvent], end: int) -> bool:
        """Nothing to follow: no other process appends to this store."""
        return False

    def _settle_batch(self) -> None:
        batch, self._queue = self._queue, []
        planner = BatchPlanner(self._heads, len(self._log), self._last_recorded_at, self._event_ids,
                               list(self._claims.values()))
        try:
            outcomes = [planner.plan(request) for request in batch]
        except Exception as exc:  # as the batcher: a failure of the batch itself fails each request
            for request in batch:
                _finish(request, exc)
            return
        for row in planner.rows:
            self._record(row)
        self._heads = planner.streams
        self._event_ids = planner.known
        self._claims.update({(r.scope, r.key): r for r in planner.responses})
        self._last_recorded_at = planner.recorded_at if planner.rows else self._last_recorded_at
        self.batches += 1
        self.batched_requests += len(batch)
        for request, outcome in zip(batch, outcomes, strict=True):
            _finish(request, outcome)

    def _record(self, row: Planned) -> None:
        event = RecordedEvent(row.position, row.stream_id, row.version, row.event.type, orjson.loads(row.event.data),
                              orjson.loads(row.event.metadata), row.event.event_id, row.recorded_at, row.hash)
        assert event.position == len(self._log) + 1, "the planner numbers positions on from the head"
        self._log.append(event)
        self._streams.setdefault(event.stream_id, []).append(event)

    async def stored_outcome(self, scope: str, key: str) -> StoredOutcome | None:
        return self._claims.get((scope, key))

    def counters(self) -> StoreCounters:
        """Batches as settled; nothing here is fenced or answered by a query."""
        return StoreCounters(self.batches, self.batched_requests, 0, 0, 0, 0, 0, {})

    async def close(self) -> None:
        self._closing = True
        if self._queue:
            await self.settled(self._queue[-1])

    # ---------------------------------------------------------------- reading

    async def read_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> list[RecordedEvent]:
        events = self._streams.get(stream_id, [])
        return events[after_version:to_version or None]  # versions are gap-free from 1; 0: no bound, as in SQL

    async def read_tail(self, stream_id: str, after_version: int) -> list[RecordedEvent]:
        return await self.read_stream(stream_id, after_version)

    async def stream_version(self, stream_id: str) -> int:
        return self._heads.get(stream_id, (0, GENESIS))[0]

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = PAGE,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
    ) -> list[RecordedEvent]:
        found: list[RecordedEvent] = []
        for event in self._log[after_position:]:
            if len(found) == limit:
                break
            if (types is None or event.type in types) and (
                    stream_prefix is None or event.stream_id.startswith(stream_prefix)):
                found.append(event)
        return found

    async def iter_all(
        self,
        after_position: int = 0,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
        page_size: int = PAGE,
        to_position: int | None = None,
    ) -> AsyncIterator[RecordedEvent]:
        for event in await self.read_all(after_position, len(self._log), types, stream_prefix):
            if to_position is not None and event.position > to_position:
                return
            yield event

    async def iter_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> AsyncIterator[RecordedEvent]:
        for event in await self.read_stream(stream_id, after_version, to_version):
            yield event

    async def head(self) -> int:
        return len(self._log)


def _finish(request: AppendRequest, outcome: AppendResult | Exception) -> None:
    """Settle one request: its outcome, its settle callback, whoever waits for it (as the batcher does)."""
    request.outcome = outcome
    request.after = ()
    if request.on_settle is not None:
        try:
            request.on_settle(request)
        except Exception:
            log.exception("an append's settle callback failed")
    for waiter in request.waiters:
        if not waiter.done():
            waiter.set_result(None)
    if not request.future.done():
        if isinstance(outcome, Exception):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)
