"""Aggregates in and out of the event store: their streams, snapshots, an in-process cache.

Loading takes the cached copy (or the latest snapshot) and applies the stream's tail after it, so
a load always reflects every committed event; the cache and the snapshots only save work. Saving
turns the aggregates' pending events into one atomic multi-stream append with expected versions.

A command's optimistic attempt (Repository.attempt, opened by the command bus around one attempt)
may instead start from this process's own state of a stream: its cache when this process appended
last, or the state an append of this process still in flight will leave (staged). A decision on
staged state names that append as its predecessor, and the store commits it only if the predecessor
committed: so commands on one hot stream follow each other without waiting for each other's commit,
and never stand on a history that did not happen.

Events become rows, and rows events, by backend/store/event_codec.py.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextvars import ContextVar, Token
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import orjson
from eventsourcing.domain import Aggregate

from backend.domain import registry
from backend.domain.closed import AppendOnlyMap
from backend.store import reads
from backend.store.event_codec import fold, to_new_event
from backend.store.events import AppendResult, RecordedEvent, Write, recorded_time
from backend.store.idempotency import IdempotencyClaim
from backend.store.interface import EventLog
from backend.store.planner import AppendRequest
from backend.store.reads import Executor
from backend.store.state_codec import decode_state, encode_state

log = logging.getLogger(__name__)

A = TypeVar("A", bound=Aggregate)

COPIED = (dict, set, list, AppendOnlyMap)


@functools.cache
def _is_copied(cls: type) -> bool:
    """Per type, not per value: isinstance against AppendOnlyMap, an ABC, runs Python code each time."""
    return issubclass(cls, COPIED)


def clone(aggregate: A) -> A:
    """A copy whose containers are copied one level deep.

    Enough because aggregate state holds only immutable values (ints, strings, UUIDs, datetimes,
    NamedTuples) inside its dicts, sets, lists and AppendOnlyMaps; and much cheaper than deepcopy.
    What grows forever (a wallet's closed ids) is kept in AppendOnlyMaps, whose copy is O(log n)."""
    copied = object.__new__(type(aggregate))
    state = {k: v.copy() if _is_copied(v.__class__) else v for k, v in vars(aggregate).items()}
    object.__setattr__(copied, "__dict__", state)
    return copied


class CacheTrust:
    """Leave for one attempt of a command to decide on this process's own state of streams without
    reading them, and the record of the in-flight appends that state depends on (see the module)."""

    __slots__ = ("after",)

    def __init__(self) -> None:
        self.after: dict[int, AppendRequest] = {}


_ATTEMPT: ContextVar[tuple[Repository, CacheTrust] | None] = ContextVar("tally_command_attempt", default=None)
"""The optimistic attempt the running task is inside of, and its repository (task-local, not shared)."""


class Attempt:
    """The context of one command attempt: sets, then resets, the running task's current attempt."""

    __slots__ = ("repository", "token", "trust")

    def __init__(self, repository: Repository, trust: CacheTrust | None) -> None:
        self.repository = repository
        self.trust = trust
        self.token: Token[tuple[Repository, CacheTrust] | None] | None = None

    def __enter__(self) -> CacheTrust | None:
        trust = self.trust
        self.token = _ATTEMPT.set((self.repository, trust) if trust is not None else None)
        return trust

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _ATTEMPT.reset(self.token)


class AggregateNotFound(LookupError):
    def __init__(self, stream_id: str) -> None:
        super().__init__(f"{stream_id} does not exist")
        self.stream_id = stream_id


def stream_of(cls: type[Aggregate], aggregate_id: UUID) -> str:
    for category, aggregate_class in registry.AGGREGATE_TYPES.items():
        if aggregate_class is cls:
            return registry.stream_for(category, aggregate_id)
    raise TypeError(f"unregistered aggregate type {cls.__name__}")


class Repository:
    def __init__(self, store: EventLog, *, snapshot_every: int = 100, cache_size: int = 10_000) -> None:
        self.store = store
        self.snapshot_every = snapshot_every
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Aggregate] = OrderedDict()
        self._staged: dict[str, tuple[Aggregate, AppendRequest]] = {}
        """Per stream, the latest append of this process still in flight, and the state it leaves."""

    async def get(self, cls: type[A], aggregate_id: UUID) -> A:
        found = await self.find(cls, aggregate_id)
        if found is None:
            raise AggregateNotFound(stream_of(cls, aggregate_id))
        return found

    def attempt(self, optimistic: bool) -> Attempt:
        """One attempt of a command (the command bus's), as a context manager giving its CacheTrust (None
        when not optimistic). Inside an optimistic one, `find` trusts this process's own state of
        streams: the state an append still in flight will leave (recorded in the trust's `after`), or a
        cached copy at the version this process last appended. No round trip, but possibly stale if
        another process appended since; so the bus lets the answer stand only if it stands or falls
        with an append expecting those versions (and passes the trust to `stage`)."""
        return Attempt(self, CacheTrust() if optimistic else None)

    async def find(self, cls: type[A], aggregate_id: UUID, *, verified: bool = False) -> A | None:
        """The aggregate with every committed event applied, or None if its stream is empty.

        Inside an optimistic attempt (see `attempt`) it may be this process's own state of the stream
        instead, unless `verified`: for an aggregate a command answers with but does not append to,
        whose cached copy no expected version would check."""
        stream = stream_of(cls, aggregate_id)
        trust = None
        if not verified and (current := _ATTEMPT.get()) is not None and current[0] is self:
            trust = current[1]
        if trust is not None and (staged := self._staged.get(stream)) is not None:
            aggregate, request = staged
            trust.after[id(request)] = request
            return self._checked(cls, stream, clone(aggregate))
        start: Aggregate | None
        cached = self._cache.get(stream)
        trusted = False
        if cached is not None:
            self._cache.move_to_end(stream)
            start = clone(cached)
            trusted = trust is not None and self.store.knows(stream, cached.version)
        else:
            start = await self._from_snapshot(cls, stream, aggregate_id)
        tail = [] if trusted else await self.store.read_tail(stream, start.version if start is not None else 0)
        found = fold(tail, start, aggregate_id)
        if found is None:
            return None
        aggregate = self._checked(cls, stream, found)
        if tail or cached is None:
            self._remember(stream, aggregate)
        return aggregate

    async def settled(self, streams: Sequence[str]) -> None:
        """Until no append of this process to these streams is in flight."""
        for stream in streams:
            while (staged := self._staged.get(stream)) is not None:
                await self.store.settled(staged[1])

    @staticmethod
    def _checked(expected: type[A], stream: str, aggregate: Aggregate) -> A:
        if not isinstance(aggregate, expected):
            raise TypeError(f"{stream} holds a {type(aggregate).__name__}, not a {expected.__name__}")
        return aggregate

    async def as_of(
        self, cls: type[A], aggregate_id: UUID, *, position: int | None = None, time: datetime | None = None,
        db: Executor | None = None,
    ) -> tuple[A | None, int]:
        """The aggregate from its events up to a position or a recorded time (no cache, no snapshot);
        read through db when given (a read replica), else the store."""
        stream = stream_of(cls, aggregate_id)
        found = await (self.store.read_stream(stream) if db is None else reads.read_stream(db, stream))
        events = [
            e for e in found
            if (position is None or e.position <= position)
            and (time is None or recorded_time(e.position, e.recorded_at) <= time)
        ]
        aggregate = fold(events, None, aggregate_id)
        if aggregate is not None and not isinstance(aggregate, cls):
            raise TypeError(f"{stream} holds a {type(aggregate).__name__}, not a {cls.__name__}")
        return aggregate, (events[-1].position if events else 0)

    def writes(self, aggregates: Sequence[Aggregate], metadata: Mapping[str, Any]) -> list[Write]:
        """Pending events of each aggregate as one write, expecting the version it was loaded at."""
        writes = []
        for aggregate in aggregates:
            pending = aggregate.collect_events()
            if not pending:
                continue
            expected = pending[0].originator_version - 1
            events = [to_new_event(e, metadata) for e in pending]  # type: ignore[arg-type]
            writes.append(Write(registry.stream_id(aggregate), expected, events))
        return writes

    async def save(
        self,
        *aggregates: Aggregate,
        metadata: Mapping[str, Any] | None = None,
        claim: IdempotencyClaim | None = None,
        extra_writes: Sequence[Write] = (),
        trust: CacheTrust | None = None,
    ) -> AppendResult:
        """Append the aggregates' pending events, plus ``extra_writes`` (streams that are not
        aggregates, e.g. a uniqueness claim expecting NO_STREAM), all in one atomic append.

        Once saved, the aggregates belong to the repository (every load hands out a copy): a caller
        must not change them any more, but load the aggregate again for its next command."""
        return await self.committed(self.stage(*aggregates, metadata=metadata, claim=claim,
                                               extra_writes=extra_writes, trust=trust))

    def stage(
        self,
        *aggregates: Aggregate,
        metadata: Mapping[str, Any] | None = None,
        claim: IdempotencyClaim | None = None,
        extra_writes: Sequence[Write] = (),
        trust: CacheTrust | None = None,
    ) -> AppendRequest:
        """Submit the append of ``save`` without waiting for it (``committed`` does). Until it settles,
        optimistic loads of its streams start from the state it leaves, and depend on it."""
        staged = [(registry.stream_id(a), a) for a in aggregates if a.pending_events]
        writes = self.writes(aggregates, metadata or {})
        request = self.store.submit(
            [*writes, *extra_writes], claim, after=tuple(trust.after.values()) if trust else (),
            on_settle=lambda settled: self._settled(settled, staged), fresh=not extra_writes,
        )
        for stream, aggregate in staged:
            self._staged[stream] = (aggregate, request)
        return request

    async def committed(self, request: AppendRequest) -> AppendResult:
        """The outcome of a staged append (and a snapshot when a stream crossed a multiple of snapshot_every)."""
        result = await self.store.outcome(request)
        if not result.replayed:
            for appended in result.streams:
                before = appended.version - len(appended.positions)
                cached = self._cache.get(appended.stream_id)  # what the append left, for aggregates
                if appended.version // self.snapshot_every > before // self.snapshot_every \
                        and cached is not None and cached.version == appended.version:
                    await self._snapshot(cached)
        return result

    def _settled(self, request: AppendRequest, staged: list[tuple[str, Aggregate]]) -> None:
        """The batcher settled a staged append: what it leaves becomes the cached state. If it did not
        commit, the cached copy stays: it holds only committed history (a version that someone else
        may since have passed), so the next load reads just the events after it, not the stream from
        its last snapshot (with several workers, every lost race on a hot wallet would do that)."""
        for stream, aggregate in staged:
            if (entry := self._staged.get(stream)) is not None and entry[1] is request:
                del self._staged[stream]
            if request.committed:
                self._remember(stream, aggregate, owned=True)

    async def follow_log(self, after: int, events: list[RecordedEvent], end: int) -> None:
        """A log tail subscriber (with several workers): every process's appends, in order. The store's
        known stream heads move on, and so do the cached aggregates, by applying the events this process
        did not make; so a command on a wallet another worker just changed still takes the fast path.
        A cached copy that cannot be brought up to date (a version skipped) is dropped."""
        self.store.follow(events, end)
        cache = self._cache
        touched: dict[str, list[RecordedEvent]] = {}
        for event in events:
            if event.stream_id in cache:
                touched.setdefault(event.stream_id, []).append(event)
        for stream, followed in touched.items():
            cached = cache[stream]
            run = [event for event in followed if event.version > cached.version]
            if not run:
                continue  # this process's own append, or one it has read already
            if run[0].version != cached.version + 1:
                del cache[stream]
                continue
            try:  # in place: the cache's own copy, only ever handed out as clones (a failure drops it)
                folded = fold(run, cached, cached.id)
            except Exception:
                log.exception("could not apply followed events to a cached aggregate", extra={"stream": stream})
                del cache[stream]
                continue
            if folded is not None:
                cache[stream] = folded

    def forget(self, *stream_ids: str) -> None:
        for stream in stream_ids:
            self._cache.pop(stream, None)

    def _remember(self, stream: str, aggregate: Aggregate, *, owned: bool = False) -> None:
        """Cache a copy, or with `owned` the instance itself (save's caller hands it over); never an
        older version than the cached one (a load that read before an append settled comes back late)."""
        cached = self._cache.get(stream)
        if cached is not None and cached.version > aggregate.version:
            return
        self._cache[stream] = aggregate if owned else clone(aggregate)
        self._cache.move_to_end(stream)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _snapshot(self, aggregate: Aggregate) -> None:
        state = {k: v for k, v in vars(aggregate).items() if k not in ("_id", "_version", "_pending_events")}
        payload = {"class_version": getattr(type(aggregate), "class_version", 1), "state": encode_state(state)}
        await self.store.snapshots.save(registry.stream_id(aggregate), aggregate.version, type(aggregate).__name__,
                                        orjson.dumps(payload).decode())

    async def _from_snapshot(self, cls: type[A], stream: str, aggregate_id: UUID) -> A | None:
        found = await self.store.snapshots.latest(stream)
        if found is None:
            return None
        version, payload = found
        if payload.get("class_version") != getattr(cls, "class_version", 1):
            return None
        try:
            state = decode_state(payload["state"])
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring undecodable snapshot", extra={"stream": stream, "error": repr(exc)})
            return None
        state.update({"_id": aggregate_id, "_version": version, "_pending_events": []})
        aggregate = object.__new__(cls)
        object.__setattr__(aggregate, "__dict__", state)
        return aggregate
