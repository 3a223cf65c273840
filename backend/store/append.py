"""Appending: a per-process batcher that merges concurrent appends into one transaction.

The protocol (the fenced one-round-trip path, the general locked path, and why positions are gap-free
and never skipped) is described once, in docs/ARCHITECTURE.md, "The append protocol".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from backend.store import idempotency
from backend.store.encoding import encode_writes
from backend.store.events import AppendResult, StoreError, Write
from backend.store.idempotency import IdempotencyClaim
from backend.store.planner import AppendRequest, BatchPlanner, KnownHeads

log = logging.getLogger(__name__)

APPEND_LOCK_KEY = 0x7A11_0002
NOTIFY_CHANNEL = "tally_events"
INT64_MAX = 2**63 - 1

# The general path's four round trips: BEGIN and the lock as one simple query, one read of everything
# the planner needs, one write of everything planned (events, idempotency records, NOTIFY), COMMIT.
BEGIN_AND_LOCK_SQL = f"begin; select pg_advisory_xact_lock({APPEND_LOCK_KEY})"

_NULLS = "null::text, null::text, null::bytea, null::bytea"
STATE_SQL = f"""
select 'stream' as kind, s.stream_id, e.version, e.hash, null::bigint as position,
       null::timestamptz as recorded_at, null::uuid as event_id, null::text as type, null::jsonb as data,
       null::text as scope, null::text as key, null::bytea as fingerprint, null::bytea as outcome
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
select 'claim', null, null, null, position, null, null, null, null, scope, key, fingerprint, outcome
from idempotency_keys where (scope, key) in (select * from unnest($3::text[], $4::text[]))
"""

# The rows travel as two jsonb documents (migration 0006 says why, 0006 and 0008 how they are laid out).
FENCED_SQL = "select tally_append_fenced_rows($1, $2, $3::jsonb, $4::jsonb)"
WRITE_SQL = "select tally_insert_appended($1::jsonb, $2::jsonb), pg_notify('tally_events', $3::text)"


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
        self._idle = asyncio.Event()  # no batch is executing (a caller's own, or the worker's)
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._conn: PoolConnectionProxy[asyncpg.Record] | None = None
        self._on_lost: Callable[[Any], None] | None = None
        self._heads = KnownHeads()
        self.fenced = 0
        self.fence_misses = 0
        self.batches = 0
        self.batched_requests = 0
        self.on_batch_done: Callable[[float, int], None] | None = None
        """Called with each committed batch's seconds, from taking it to its commit, and its number of
        append calls (for /metrics)."""

    async def append(self, writes: Sequence[Write], claim: IdempotencyClaim | None = None) -> AppendResult:
        """Append atomically; with a claim, also record its response, unless the key is already used
        (then raise IdempotencyKeyUsed and append nothing). A claim may come with no writes at all."""
        return await self.wait(self.submit(writes, claim))

    def submit(
        self,
        writes: Sequence[Write],
        claim: IdempotencyClaim | None = None,
        *,
        after: Sequence[AppendRequest] = (),
        on_settle: Callable[[AppendRequest], None] | None = None,
    ) -> AppendRequest:
        """Queue an append without waiting for it (`wait` gives its outcome). Requests settle in the
        order they were submitted, so a caller may decide its next append on the state a submitted one
        will leave, naming it in `after`: the next one then commits only if that one did."""
        encoded, count, size = encode_writes(writes, allow_empty=claim is not None)
        if self._closing:
            raise StoreError("the event store is shutting down")
        loop = asyncio.get_running_loop()
        request = AppendRequest(encoded, count, size, claim, loop.create_future(), tuple(after), on_settle=on_settle)
        self._queue.append(request)
        if self._runs_inline(request):
            loop.call_soon(self._kick)  # the caller's wait normally runs it; if it never comes, the worker does
        else:
            self._wake_worker()
        return request

    async def wait(self, request: AppendRequest) -> AppendResult:
        """The outcome of a submitted request. A queued request goes on if this caller is cancelled: its
        future is then cancelled with it, and the batch leaves a done future alone."""
        future = request.future
        if self._runs_inline(request):
            # Nothing in flight, nothing else queued: this caller runs its batch of one itself (handing it
            # to the worker would cost two turns of the event loop and batch nothing).
            self._queue.pop()
            try:
                await self._settle([request])
            finally:
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved, even if this caller was cancelled meanwhile
            return future.result()
        self._wake_worker()
        return await future

    @staticmethod
    async def settled(request: AppendRequest) -> None:
        """Until the request's batch has settled (whatever its outcome, and even if its caller left)."""
        if request.outcome is None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            request.waiters.append(waiter)
            await waiter

    def _runs_inline(self, request: AppendRequest) -> bool:
        return self._idle.is_set() and len(self._queue) == 1 and self._queue[0] is request and not self._linger_s

    def _kick(self) -> None:
        if self._queue and self._idle.is_set():
            self._wake_worker()

    def _wake_worker(self) -> None:
        self._wake.set()
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="append-batcher")

    def knows(self, stream_id: str, version: int) -> bool:
        """This process last saw the stream at this version and has not seen anyone else append since;
        the fenced append checks the second part in the database (see KnownHeads)."""
        return self._heads.knows(stream_id, version)

    def heads_seen(self, head: int, streams: dict[str, tuple[int, bytes]]) -> None:
        """A read saw these stream heads at log head `head` (see KnownHeads.seen)."""
        self._heads.seen(head, streams)

    async def close(self) -> None:
        """Finish what is queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._worker is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await self._idle.wait()
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
            if not self._queue or not self._idle.is_set():
                if self._closing and not self._queue:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._linger_s and len(self._queue) == 1:
                await asyncio.sleep(self._linger_s)
            await self._settle(self._take_batch())

    async def _settle(self, batch: list[AppendRequest]) -> None:
        """Execute one batch (never two at once) and settle each request's future with its outcome."""
        self._idle.clear()
        started = time.perf_counter()
        try:
            try:
                outcomes = await self._execute(batch)
            except BaseException as exc:
                failure = exc if isinstance(exc, Exception) else StoreError("cancelled")
                for request in batch:
                    self._finish(request, failure)
                if not isinstance(exc, Exception):
                    raise
                log.warning("append batch failed", extra={"requests": len(batch), "error": repr(exc)})
                return
            self.batches += 1
            self.batched_requests += len(batch)
            if self.on_batch_done is not None:
                self.on_batch_done(time.perf_counter() - started, len(batch))
            for request, outcome in zip(batch, outcomes, strict=True):
                self._finish(request, outcome)
        finally:
            self._idle.set()
            if self._queue:
                self._wake.set()

    @staticmethod
    def _finish(request: AppendRequest, outcome: AppendResult | Exception) -> None:
        request.outcome = outcome
        request.after = ()  # planned: let the predecessors go (a hot stream's chain would grow forever)
        if request.on_settle is not None:
            try:
                request.on_settle(request)
            except Exception:
                log.exception("an append's settle callback failed")
        for waiter in request.waiters:
            if not waiter.done():
                waiter.set_result(None)
        future = request.future
        if not future.done():
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

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
        planner = BatchPlanner(known, self._heads.head, self._heads.recorded_at)
        outcomes = [planner.plan(request) for request in batch]
        if any(isinstance(o, Exception) for o in outcomes) or not (planner.rows or planner.responses):
            return None
        try:
            code = await conn.fetchval(FENCED_SQL, APPEND_LOCK_KEY, self._heads.head, planner.event_rows(),
                                       idempotency.claim_rows(planner.responses))
        except asyncpg.UniqueViolationError:
            code = -2  # an event id or idempotency key is taken: the general path says which, and how
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
        planner = BatchPlanner.from_state(rows)
        foreign_writes = planner.head != self._heads.head
        outcomes = [planner.plan(request) for request in batch]
        if planner.rows or planner.responses:
            await conn.execute(WRITE_SQL, planner.event_rows(), idempotency.claim_rows(planner.responses),
                               str(planner.head))
        await conn.execute("commit")
        self._heads.advance(planner, set(stream_ids), foreign_writes=foreign_writes)
        return outcomes

    async def _connection(self) -> PoolConnectionProxy[asyncpg.Record]:
        """The batcher keeps one pooled connection for itself: no acquire and reset per batch.

        When the server drops that connection while the batcher holds it idle (a restart), asyncpg
        hands it back to the pool at once, and any later call on it raises InterfaceError ("released
        back to the pool"), which is no outage error: a termination listener forgets it, so the next
        batch acquires another, or fails as unavailable while the server is down, instead of a 500.
        The listener runs a loop iteration later, so a batch may come first: it checks too."""
        if self._conn is not None and not _usable(self._conn):
            self._drop()  # asyncpg has taken it back already: nothing to release
        if self._conn is None:
            conn = await self._pool.acquire()

            def forget(_: object) -> None:
                if self._conn is conn:  # not a later one: the listener may run after a reacquire
                    self._conn = None

            conn.add_termination_listener(forget)
            self._conn, self._on_lost = conn, forget
        return self._conn

    def _drop(self) -> PoolConnectionProxy[asyncpg.Record] | None:
        conn, self._conn = self._conn, None
        if conn is not None and self._on_lost is not None:
            with contextlib.suppress(Exception):  # a connection already handed back refuses calls
                conn.remove_termination_listener(self._on_lost)
        return conn

    async def _discard_connection(self) -> None:
        """After any failure: the pool rolls back (or replaces) the connection on release."""
        conn = self._drop()
        if conn is not None:
            with contextlib.suppress(Exception):
                await self._pool.release(conn)

    async def _release_connection(self) -> None:
        conn = self._drop()
        if conn is not None:
            await self._pool.release(conn)


def _usable(conn: PoolConnectionProxy[asyncpg.Record]) -> bool:
    """Whether a held connection can still be called: one asyncpg handed back to the pool refuses
    every call, is_closed() included."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
