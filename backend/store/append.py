"""Appending: validation, then a per-process batcher that merges concurrent appends into one transaction.

Readers never skip: every append transaction first takes one store-wide transaction lock, assigns the
next positions under it and commits before releasing it, so positions become visible strictly in
order across any number of processes (a reader that saw P never later sees an event below P), and
they are gap-free. The lock is paid once per batch, not once per command: while one batch commits,
the next fills up, so under load one transaction carries many commands and with one client nothing
waits. Each request in a batch succeeds or fails on its own (a stale expected version or a
conflicting duplicate fails only that request); all the writes of one request commit together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from backend.store import idempotency
from backend.store.events import (
    ANY,
    MAX_STREAM_ID_LENGTH,
    MAX_TYPE_LENGTH,
    AppendResult,
    DuplicateEventId,
    InvalidEvent,
    StoreError,
    StreamAppended,
    Write,
    WrongExpectedVersion,
)
from backend.store.hashing import GENESIS, canonical_bytes, chain, encode_data
from backend.store.idempotency import IdempotencyClaim, IdempotencyKeyUsed, StoredResponse

log = logging.getLogger(__name__)

APPEND_LOCK_KEY = 0x7A11_0002
NOTIFY_CHANNEL = "tally_events"
INT64_MAX = 2**63 - 1

# Four round trips per batch: BEGIN and the lock as one simple query, one read of everything the
# planner needs, one write of everything planned (events, idempotency records, NOTIFY), COMMIT.
BEGIN_AND_LOCK_SQL = f"begin; select pg_advisory_xact_lock({APPEND_LOCK_KEY})"

_NULLS = "null::text, null::text, null::bytea, null::int, null::bytea, null::text"
STATE_SQL = f"""
select 'stream' as kind, s.stream_id, e.version, e.hash, null::bigint as position,
       null::timestamptz as recorded_at, null::uuid as event_id, null::text as type, null::jsonb as data,
       null::text as scope, null::text as key, null::bytea as fingerprint, null::int as status,
       null::bytea as body, null::text as content_type
from unnest($1::text[]) as s(stream_id)
cross join lateral (
    select version, hash from events where events.stream_id = s.stream_id order by version desc limit 1
) as e
union all
(select 'head', null, null, null, position, recorded_at, null, null, null, {_NULLS}
 from events order by position desc limit 1)
union all
select 'event', stream_id, version, null, position, null, event_id, type, data, {_NULLS}
from events where event_id = any($2::uuid[])
union all
select 'claim', null, null, null, position, null, null, null, null, scope, key, fingerprint, status, body,
       content_type
from idempotency_keys where (scope, key) in (select * from unnest($3::text[], $4::text[]))
"""

FENCED_SQL = """
select tally_append_fenced($1, $2, $3::bigint[], $4::text[], $5::int[], $6::text[], $7::text[], $8::text[],
                           $9::uuid[], $10::timestamptz[], $11::bytea[], $12::text[], $13::text[], $14::bytea[],
                           $15::int[], $16::bytea[], $17::text[], $18::bigint[])
"""

WRITE_SQL = """
with inserted as (
    insert into events (position, stream_id, version, type, data, metadata, event_id, recorded_at, hash)
    select p, s, v, t, d::jsonb, m::jsonb, i, r, h
    from unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::text[], $6::text[], $7::uuid[],
                $8::timestamptz[], $9::bytea[]) as x(p, s, v, t, d, m, i, r, h)
    returning 1
), claimed as (
    insert into idempotency_keys (scope, key, fingerprint, status, body, content_type, position)
    select * from unnest($10::text[], $11::text[], $12::bytea[], $13::int[], $14::bytea[], $15::text[],
                         $16::bigint[])
    returning 1
)
select pg_notify('tally_events', $17::text), (select count(*) from inserted), (select count(*) from claimed)
"""


@dataclass(slots=True)
class EncodedEvent:
    type: str
    data: bytes
    metadata: bytes
    event_id: uuid.UUID


@dataclass(slots=True)
class EncodedWrite:
    stream_id: str
    expected_version: int
    events: list[EncodedEvent]


@dataclass(slots=True)
class AppendRequest:
    writes: list[EncodedWrite]
    event_count: int
    size: int
    claim: IdempotencyClaim | None
    future: asyncio.Future[AppendResult]


def _check_json(value: Any, path: str) -> None:
    """Event data is JSON without floats (money is integer minor units) and with 64-bit integers."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        if isinstance(value, str) and "\x00" in value:
            raise InvalidEvent(f"{path}: strings may not contain NUL characters")
        return
    if isinstance(value, int):
        if not -INT64_MAX - 1 <= value <= INT64_MAX:
            raise InvalidEvent(f"{path}: integer out of 64-bit range")
        return
    if isinstance(value, float):
        raise InvalidEvent(f"{path}: floats are not allowed in events; use integers")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEvent(f"{path}: object keys must be strings")
            _check_json(item, f"{path}.{key}")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_json(item, f"{path}[{index}]")
        return
    raise InvalidEvent(f"{path}: {type(value).__name__} is not a JSON value")


def encode_writes(writes: Sequence[Write], *, allow_empty: bool = False) -> tuple[list[EncodedWrite], int, int]:
    """Validate and encode an append call; raises InvalidEvent before anything reaches the database."""
    if not writes and not allow_empty:
        raise InvalidEvent("an append needs at least one write")
    encoded: list[EncodedWrite] = []
    seen_ids: set[uuid.UUID] = set()
    size = 0
    for write in writes:
        stream_id = write.stream_id
        if not isinstance(stream_id, str) or not 1 <= len(stream_id) <= MAX_STREAM_ID_LENGTH:
            raise InvalidEvent(f"stream_id must be a string of 1 to {MAX_STREAM_ID_LENGTH} characters")
        if "\x00" in stream_id:
            raise InvalidEvent("stream_id may not contain NUL characters")
        expected = write.expected_version
        if isinstance(expected, bool) or not isinstance(expected, int) or expected < ANY:
            raise InvalidEvent(f"expected_version must be an integer >= 0, NO_STREAM or ANY, got {expected!r}")
        if not write.events:
            raise InvalidEvent(f"write to {stream_id!r} has no events")
        events = []
        for event in write.events:
            if not isinstance(event.type, str) or not 1 <= len(event.type) <= MAX_TYPE_LENGTH:
                raise InvalidEvent(f"event type must be a string of 1 to {MAX_TYPE_LENGTH} characters")
            if not isinstance(event.data, Mapping):
                raise InvalidEvent("event data must be a JSON object")
            if not isinstance(event.event_id, uuid.UUID):
                raise InvalidEvent("event_id must be a UUID")
            if event.event_id in seen_ids:
                raise InvalidEvent(f"event_id {event.event_id} appears twice in one append")
            seen_ids.add(event.event_id)
            _check_json(event.data, "data")
            _check_json(event.metadata, "metadata")
            data = encode_data(event.data)
            metadata = encode_data(event.metadata)
            size += len(data) + len(metadata)
            events.append(EncodedEvent(event.type, data, metadata, event.event_id))
        encoded.append(EncodedWrite(stream_id, expected, events))
    return encoded, len(seen_ids), size


@dataclass(slots=True)
class _Planned:
    """One event that the batch will insert."""

    position: int
    stream_id: str
    version: int
    event: EncodedEvent
    recorded_at: datetime
    hash: bytes


class AppendBatcher:
    """Merges concurrent append calls of one process into as few transactions as possible."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_batch_events: int = 2000,
        max_batch_bytes: int = 8 * 1024 * 1024,
        linger_s: float = 0.0,
    ) -> None:
        self._pool = pool
        self._max_events = max_batch_events
        self._max_bytes = max_batch_bytes
        self._linger_s = linger_s
        self._queue: list[AppendRequest] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None
        self._heads = _KnownHeads()
        self.fenced = 0
        self.fence_misses = 0
        self.batches = 0
        self.batched_requests = 0

    async def append(self, writes: Sequence[Write], claim: IdempotencyClaim | None = None) -> AppendResult:
        """Append atomically; with a claim, also record its response, unless the key is already used
        (then raise IdempotencyKeyUsed and append nothing). A claim may come with no writes at all."""
        encoded, count, size = encode_writes(writes, allow_empty=claim is not None)
        if self._closing:
            raise StoreError("the event store is shutting down")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append(AppendRequest(encoded, count, size, claim, future))
        self._wake.set()
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="append-batcher")
        # The batch goes on if this caller is cancelled: its outcome is then simply not awaited.
        return await asyncio.shield(future)

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self._release_connection()

    def _take_batch(self) -> list[AppendRequest]:
        batch: list[AppendRequest] = []
        events = size = 0
        while self._queue:
            request = self._queue[0]
            if batch and (events + request.event_count > self._max_events or size + request.size > self._max_bytes):
                break
            batch.append(self._queue.pop(0))
            events += request.event_count
            size += request.size
        return batch

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._linger_s and len(self._queue) == 1:
                await asyncio.sleep(self._linger_s)
            batch = self._take_batch()
            try:
                outcomes = await self._execute(batch)
            except BaseException as exc:
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(exc if isinstance(exc, Exception) else StoreError("cancelled"))
                if not isinstance(exc, Exception):
                    raise
                log.warning("append batch failed", extra={"requests": len(batch), "error": repr(exc)})
                continue
            self.batches += 1
            self.batched_requests += len(batch)
            for request, outcome in zip(batch, outcomes, strict=True):
                if request.future.done():
                    continue
                if isinstance(outcome, Exception):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)

    async def _execute(self, batch: list[AppendRequest]) -> list[AppendResult | Exception]:
        conn = await self._connection()
        try:
            outcomes = await self._execute_fenced(conn, batch)
            if outcomes is None:
                outcomes = await self._execute_locked(conn, batch)
        except BaseException:
            self._heads.forget()
            await self._discard_connection()
            raise
        return outcomes

    async def _execute_fenced(
        self, conn: PoolConnectionProxy[asyncpg.Record], batch: list[AppendRequest]
    ) -> list[AppendResult | Exception] | None:
        """One round trip, when this process knows every stream's head and was the last to append.

        None means "take the general path": a stream is not cached, a request would fail (a failure
        computed from a cache is not trusted), or the database refused the fence."""
        stream_ids = {w.stream_id for r in batch for w in r.writes}
        known = self._heads.lookup(stream_ids)
        if known is None or self._heads.head is None:
            return None
        planner = _BatchPlanner(known, self._heads.head, self._heads.recorded_at)
        outcomes = [planner.plan(request) for request in batch]
        if any(isinstance(o, Exception) for o in outcomes) or not (planner.rows or planner.responses):
            return None
        code = await conn.fetchval(FENCED_SQL, APPEND_LOCK_KEY, self._heads.head, *planner.columns(),
                                   *idempotency.insert_columns(planner.responses))
        if code != 0:
            self.fence_misses += 1
            return None
        self._heads.advance(planner, stream_ids, foreign_writes=False)
        self.fenced += 1
        return outcomes

    async def _execute_locked(
        self, conn: PoolConnectionProxy[asyncpg.Record], batch: list[AppendRequest]
    ) -> list[AppendResult | Exception]:
        """The general path: read the state under the lock, plan, write, commit (four round trips)."""
        stream_ids = sorted({w.stream_id for r in batch for w in r.writes})
        event_ids = [e.event_id for r in batch for w in r.writes for e in w.events]
        claims = [r.claim for r in batch if r.claim is not None]
        await conn.execute(BEGIN_AND_LOCK_SQL)
        rows = await conn.fetch(STATE_SQL, stream_ids, event_ids, [c.scope for c in claims], [c.key for c in claims])
        planner = _BatchPlanner.from_state(rows)
        foreign_writes = planner.head != self._heads.head
        outcomes = [planner.plan(request) for request in batch]
        if planner.rows or planner.responses:
            await conn.execute(WRITE_SQL, *planner.columns(), *idempotency.insert_columns(planner.responses),
                               str(planner.head))
        await conn.execute("commit")
        self._heads.advance(planner, set(stream_ids), foreign_writes=foreign_writes)
        return outcomes

    async def _connection(self) -> PoolConnectionProxy[asyncpg.Record]:
        """The batcher keeps one pooled connection for itself: no acquire and reset per batch."""
        if self._conn is None:
            self._conn = await self._pool.acquire()
        return self._conn

    async def _discard_connection(self) -> None:
        """After any failure: the pool rolls back (or replaces) the connection on release."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.release(conn)


class _KnownHeads:
    """What this process knows of the log as of its own last append: the head, and stream heads.

    Valid only while no other process appends: the fenced path checks exactly that in the database.
    When the general path finds that someone else appended, every cached stream head is dropped."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.head: int | None = None
        self.recorded_at: datetime | None = None
        self.streams: dict[str, tuple[int, bytes]] = {}

    def lookup(self, stream_ids: set[str]) -> dict[str, tuple[int, bytes]] | None:
        try:
            return {s: self.streams[s] for s in stream_ids}
        except KeyError:
            return None

    def advance(self, planner: _BatchPlanner, stream_ids: set[str], *, foreign_writes: bool) -> None:
        if foreign_writes:
            self.streams.clear()
        for stream in stream_ids:
            self.streams[stream] = planner.streams.get(stream, (0, GENESIS))
        if len(self.streams) > self.capacity:
            self.streams.clear()
        self.head = planner.head
        self.recorded_at = planner.recorded_at

    def forget(self) -> None:
        self.head = None
        self.recorded_at = None
        self.streams.clear()


class _BatchPlanner:
    """Decides, request by request, what a batch inserts, tracking streams as the batch advances them."""

    def __init__(
        self,
        streams: dict[str, tuple[int, bytes]],
        head: int,
        last_recorded_at: datetime | None,
        known: dict[uuid.UUID, tuple[int, str, int, str, bytes]] | None = None,
        used_keys: list[StoredResponse] = (),  # type: ignore[assignment]
    ):
        self.streams = dict(streams)
        self.head = head
        now = datetime.now(UTC)
        # recorded_at never goes backwards along the log, even if this host's clock lags another's.
        self.recorded_at = max(now, last_recorded_at) if last_recorded_at else now
        # event_id -> (position, stream_id, version, type, data bytes) of events already stored or planned
        self.known = dict(known or {})
        self.rows: list[_Planned] = []
        self.used_keys = {(r.scope, r.key): r for r in used_keys}
        self.responses: list[StoredResponse] = []

    @classmethod
    def from_state(cls, rows: list[asyncpg.Record]) -> _BatchPlanner:
        """From STATE_SQL's rows: stream heads, the log head, stored event ids, used idempotency keys."""
        last = next((r for r in rows if r["kind"] == "head"), None)
        return cls(
            streams={r["stream_id"]: (r["version"], bytes(r["hash"])) for r in rows if r["kind"] == "stream"},
            head=last["position"] if last else 0,
            last_recorded_at=last["recorded_at"] if last else None,
            known={
                r["event_id"]: (r["position"], r["stream_id"], r["version"], r["type"], encode_data(r["data"]))
                for r in rows if r["kind"] == "event"
            },
            used_keys=[idempotency.to_stored(r) for r in rows if r["kind"] == "claim"],
        )

    def plan(self, request: AppendRequest) -> AppendResult | Exception:
        """The outcome of one request; accepted rows and claims join the batch, rejected ones leave no trace."""
        claim = request.claim
        if claim is not None and (claim.scope, claim.key) in self.used_keys:
            return IdempotencyKeyUsed(self.used_keys[(claim.scope, claim.key)])
        replay = self._replay(request) if request.writes else None
        if replay is not None:
            return replay  # a replay of stored events does not claim the key again
        proposal = self._propose(request)
        if isinstance(proposal, Exception):
            return proposal
        result, planned, streams = proposal
        response = None
        if claim is not None:
            try:
                response = claim.record(result)
            except Exception as exc:  # a broken renderer fails its own request, not the batch
                return exc
        self._accept(planned, streams)
        if response is not None:
            self.used_keys[(response.scope, response.key)] = response
            self.responses.append(response)
        return result

    def _propose(
        self, request: AppendRequest
    ) -> tuple[AppendResult, list[_Planned], dict[str, tuple[int, bytes]]] | Exception:
        """Positions, versions and hashes for the request's events, without changing the batch yet."""
        streams: dict[str, tuple[int, bytes]] = {}
        planned: list[_Planned] = []
        results: list[StreamAppended] = []
        position = self.head
        for write in request.writes:
            version, previous = streams.get(write.stream_id) or self.streams.get(write.stream_id, (0, GENESIS))
            if write.expected_version not in (ANY, version):
                return WrongExpectedVersion(write.stream_id, write.expected_version, version)
            positions = []
            for event in write.events:
                position += 1
                version += 1
                canonical = canonical_bytes(write.stream_id, version, event.type, event.data, self.recorded_at)
                previous = chain(previous, canonical)
                planned.append(_Planned(position, write.stream_id, version, event, self.recorded_at, previous))
                positions.append(position)
            streams[write.stream_id] = (version, previous)
            results.append(StreamAppended(write.stream_id, tuple(positions), version))
        return AppendResult(tuple(results)), planned, streams

    def _accept(self, planned: list[_Planned], streams: dict[str, tuple[int, bytes]]) -> None:
        self.streams.update(streams)
        self.rows.extend(planned)
        if planned:
            self.head = planned[-1].position
        for row in planned:
            self.known[row.event.event_id] = (row.position, row.stream_id, row.version, row.event.type, row.event.data)

    def _replay(self, request: AppendRequest) -> AppendResult | Exception | None:
        """None if no event is known; the original result if all are, identically; else the conflict."""
        events = [(w.stream_id, e) for w in request.writes for e in w.events]
        matches = [self.known.get(e.event_id) for _, e in events]
        if not any(matches):
            return None
        for (stream_id, event), match in zip(events, matches, strict=True):
            if match is None:
                return DuplicateEventId(event.event_id, "while other events of the same append are not")
            if (match[1], match[3], match[4]) != (stream_id, event.type, event.data):
                return DuplicateEventId(event.event_id, "with different content")
        results = []
        for write in request.writes:
            stored = [self.known[e.event_id] for e in write.events]
            results.append(StreamAppended(write.stream_id, tuple(m[0] for m in stored), stored[-1][2]))
        return AppendResult(tuple(results), replayed=True)

    def columns(self) -> tuple[list[Any], ...]:
        rows = self.rows
        return (
            [r.position for r in rows],
            [r.stream_id for r in rows],
            [r.version for r in rows],
            [r.event.type for r in rows],
            [r.event.data.decode() for r in rows],
            [r.event.metadata.decode() for r in rows],
            [r.event.event_id for r in rows],
            [r.recorded_at for r in rows],
            [r.hash for r in rows],
        )
