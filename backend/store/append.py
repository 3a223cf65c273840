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
from datetime import datetime
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from backend.store import idempotency
from backend.store.encoding import encode_writes
from backend.store.events import (
    ANY,
    NO_STREAM,
    AppendResult,
    PredecessorFailed,
    RecordedEvent,
    StoreError,
    StreamAppended,
    Write,
    WrongExpectedVersion,
)
from backend.store.hashing import GENESIS
from backend.store.idempotency import IdempotencyClaim
from backend.store.planner import AppendRequest, BatchPlanner, KnownHeads, predecessor_failed

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

# The rows travel as two jsonb documents (migration 0006 says why and how they are laid out, 0008 the claim rows'
# layout).
FENCED_SQL = "select tally_append_on_streams($1, $2, $3, $4::jsonb, $5::jsonb, $6::jsonb)"
LOCKED_REASONS = ("unknown_stream", "rejected", "taken", "fence_missed")
"""Why requests of a batch took the locked path: a stream (or the head) this process does not know; a
request the plan from memory would refuse, where memory could be wrong (see `_final`), or that depends
on one; an event id or Idempotency-Key already stored; one of the batch's streams moved on every try."""
FENCE_TRIES = 3
"""Fenced attempts per batch: the first on what this process knows, then on the head and the stream
heads each miss told."""
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
        self.shifted = 0
        """Fenced batches that went in further on than planned (the log had moved, their streams had not)."""
        self.locked: dict[str, int] = dict.fromkeys(LOCKED_REASONS, 0)
        """Batches that took the locked path, by why the fenced one could not serve them."""
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
        fresh: bool = False,
    ) -> AppendRequest:
        """Queue an append without waiting for it (`wait` gives its outcome). Requests settle in the
        order they were submitted, so a caller may decide its next append on the state a submitted one
        will leave, naming it in `after`: the next one then commits only if that one did. `fresh` (see
        EventLog.submit) lets a version refusal planned from memory stand (`_final`)."""
        encoded, count, size = encode_writes(writes, allow_empty=claim is not None)
        if self._closing:
            raise StoreError("the event store is shutting down")
        loop = asyncio.get_running_loop()
        request = AppendRequest(encoded, count, size, claim, loop.create_future(), tuple(after), on_settle=on_settle,
                                fresh=fresh)
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

    def follow(self, events: Sequence[RecordedEvent], end: int) -> bool:
        """The log tail's page, every process's appends in order (see KnownHeads.follow)."""
        return self._heads.follow(events, end)

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
            if self._queue and not all(request.committed for request in batch):
                self._fail_dependents()
            self._idle.set()
            if self._queue:
                self._wake.set()

    def _fail_dependents(self) -> None:
        """Fail now the queued requests decided on the state a failed append would have left: their own
        batch would fail them anyway (BatchPlanner._predecessor_failed), and until then a caller deciding
        again on those streams would chain on them (Repository.find) or wait for them (Repository.settled).
        The queue is in submission order, so a chain fails in one pass."""
        kept: list[AppendRequest] = []
        for request in self._queue:
            if any(earlier.outcome is not None and not earlier.committed for earlier in request.after):
                self._finish(request, predecessor_failed(request, self._heads.streams))
            else:
                kept.append(request)
        self._queue[:] = kept

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
            fenced = await self._execute_fenced(conn, batch)
            deferred = [request for request, outcome in zip(batch, fenced, strict=True) if outcome is None]
            if len(deferred) == len(batch):
                return await self._execute_locked(conn, batch)
        except BaseException:
            await self._lost_connection()
            raise
        if not deferred:
            return [outcome for outcome in fenced if outcome is not None]
        # Part of the batch has committed: a failure of the rest is the rest's alone.
        try:
            rest: list[AppendResult | Exception] = await self._execute_locked(conn, deferred)
        except Exception as exc:
            await self._lost_connection()
            log.warning("append batch failed", extra={"requests": len(deferred), "error": repr(exc)})
            rest = [exc] * len(deferred)
        except BaseException:
            await self._lost_connection()
            raise
        left = iter(rest)
        return [outcome if outcome is not None else next(left) for outcome in fenced]

    async def _lost_connection(self) -> None:
        """After a failure in the database round trips: what this process knew may be wrong, and the
        connection may be mid-transaction."""
        self._heads.forget()
        await self._discard_connection()

    async def _execute_fenced(
        self, conn: PoolConnectionProxy[asyncpg.Record], batch: list[AppendRequest]
    ) -> list[AppendResult | Exception | None]:
        """One round trip for the requests of the batch this process can plan from memory; None for each
        it leaves to the general path (run next, in the same `_execute`).

        A request is left when one of its streams is not known (a new stream, expected at NO_STREAM, is
        taken as empty: the unique index on (stream_id, version) refuses it if it is not), or when the
        plan from memory would refuse it and memory could be behind (see `_final`), or when it depends
        on one left. The fence is the batch's own streams (migration 0010): when the log has moved on
        but they have not, the rows go in further on and the answer says by how much; when one of them
        has, the miss answers with the log's head and the batch's streams as they are, read under the
        lock, and the batch is planned again on that state and retried. Everything is left when the
        fence missed every try, or an event id or Idempotency-Key is taken (the general path says
        which, and how)."""
        everything: list[AppendResult | Exception | None] = [None] * len(batch)
        head, recorded_at = self._heads.head, self._heads.recorded_at
        if head is None:
            self.locked["unknown_stream"] += 1
            return everything
        known = self._known(batch)
        for _ in range(FENCE_TRIES):
            planner = BatchPlanner(known, head, recorded_at)
            outcomes, left = _plan_from_memory(planner, known, batch)
            if not (planner.rows or planner.responses):
                if left:
                    self.locked["unknown_stream" if len(known) < len({w.stream_id for r in batch for w in r.writes})
                                else "rejected"] += 1
                return outcomes
            sent = {row.stream_id for row in planner.rows}
            origins = {stream: (known[stream][0], known[stream][1].hex()) for stream in sent}
            try:
                miss = await conn.fetchval(FENCED_SQL, APPEND_LOCK_KEY, head, planner.recorded_at, origins,
                                           planner.event_rows(), idempotency.claim_rows(planner.responses))
            except asyncpg.UniqueViolationError:
                self.fence_misses += 1
                self.locked["taken"] += 1
                return everything
            shift = 0 if miss is None else miss.get("shift")
            if shift is not None:
                if shift:
                    self.shifted += 1
                    planner.head += shift
                    outcomes = [_shifted(outcome, shift) for outcome in outcomes]
                self._heads.advance(planner, sent, head + shift)
                self.fenced += 1
                if left:
                    self.locked["rejected"] += 1
                return outcomes
            self.fence_misses += 1
            moved = {stream: (version, bytes.fromhex(digest)) for stream, (version, digest) in miss["streams"].items()}
            # Exact as of the head the miss told, for the streams it was asked about; the others as this
            # process knew them (the fence checks every stream a batch writes).
            known = {**known, **{stream: moved.get(stream, (0, GENESIS)) for stream in sent}}
            self._heads.seen(miss["head"], moved)  # so the caches of the moved streams are not trusted
            head = miss["head"]
            recorded_at = datetime.fromisoformat(miss["recorded_at"]) if miss["recorded_at"] else None
        self.locked["fence_missed"] += 1
        return everything

    def _known(self, batch: list[AppendRequest]) -> dict[str, tuple[int, bytes]]:
        """The batch's streams this process knows (a new one, expected at NO_STREAM, as empty)."""
        known: dict[str, tuple[int, bytes]] = {}
        streams = self._heads.streams
        for request in batch:
            for write in request.writes:
                found = streams.get(write.stream_id)
                if found is not None:
                    known[write.stream_id] = found
                elif write.expected_version == NO_STREAM:
                    known.setdefault(write.stream_id, (0, GENESIS))
        return known

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
        base = planner.head
        outcomes = [planner.plan(request) for request in batch]
        if planner.rows or planner.responses:
            await conn.execute(WRITE_SQL, planner.event_rows(), idempotency.claim_rows(planner.responses),
                               str(planner.head))
        await conn.execute("commit")
        self._heads.advance(planner, set(stream_ids), base)
        return outcomes

    async def _connection(self) -> PoolConnectionProxy[asyncpg.Record]:
        """The batcher keeps one pooled connection for itself: no acquire and reset per batch.

        When the server drops that connection while the batcher holds it idle (a restart), asyncpg
        hands it back to the pool at once, and any later call on it raises InterfaceError ("released
        back to the pool"): a termination listener forgets it, so the next batch acquires another
        (or fails as unavailable while the server is down) instead of failing on a dead connection.
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
        """After any failure: end the transaction a failed general path left open (the server refused a
        write, cancelled a statement), then release; the pool replaces a broken connection. Released
        mid-transaction, asyncpg would roll it back too, but report it through the loop's exception
        handler: an ERROR line for every command refused by an outage."""
        conn = self._drop()
        if conn is not None:
            with contextlib.suppress(Exception):
                if conn.is_in_transaction():
                    await conn.execute("rollback")
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


def _plan_from_memory(
    planner: BatchPlanner, known: dict[str, tuple[int, bytes]], batch: list[AppendRequest]
) -> tuple[list[AppendResult | Exception | None], set[int]]:
    """Each request's outcome as planned from memory, None where the general path must answer; and the
    ids of those requests."""
    outcomes: list[AppendResult | Exception | None] = []
    left: set[int] = set()
    for request in batch:
        outcome: AppendResult | Exception | None = None
        if all(write.stream_id in known for write in request.writes):
            outcome = planner.plan(request)
            if isinstance(outcome, Exception) and not _final(outcome, request, left):
                outcome = None
        else:
            planner.skip(request)
        if outcome is None:
            left.add(id(request))
        outcomes.append(outcome)
    return outcomes, left


def _final(refusal: Exception, request: AppendRequest, left: set[int]) -> bool:
    """Whether a refusal planned from memory stands without asking the database, for a `fresh` request
    (no stored event can make it a replay, and its caller decides again): a version expected below
    the one this process knows the stream reached (versions only grow, so the append can never
    succeed), or a predecessor that failed for good. Memory may be behind, never ahead: a version
    expected above the known one goes the general way."""
    if not request.fresh:
        return False
    if isinstance(refusal, PredecessorFailed):
        return not any(id(earlier) in left for earlier in request.after)
    if isinstance(refusal, WrongExpectedVersion):
        return refusal.expected != ANY and refusal.expected < refusal.actual
    return False


def _shifted(outcome: AppendResult | Exception | None, shift: int) -> AppendResult | Exception | None:
    """An accepted request's result, its positions `shift` further on (migration 0010)."""
    if not isinstance(outcome, AppendResult):
        return outcome
    return AppendResult(tuple(StreamAppended(s.stream_id, tuple(p + shift for p in s.positions), s.version)
                              for s in outcome.streams))
