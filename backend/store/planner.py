"""Planning one append batch: versions, positions and hashes, request by request.

Each request succeeds or fails on its own, and a later request sees the earlier ones' events; see
docs/ARCHITECTURE.md ("The append protocol", "Chained commands") for ``after`` and the known heads.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import orjson

from backend.store import idempotency
from backend.store.encoding import EncodedEvent, EncodedWrite
from backend.store.events import (
    ANY,
    AppendResult,
    DuplicateEventId,
    PredecessorFailed,
    RecordedEvent,
    StreamAppended,
    WrongExpectedVersion,
)
from backend.store.hashing import GENESIS, canonical_bytes, chain, encode_data
from backend.store.idempotency import IdempotencyClaim, IdempotencyKeyUsed, StoredOutcome


@dataclass(slots=True, eq=False)
class AppendRequest:
    writes: list[EncodedWrite]
    event_count: int
    size: int
    claim: IdempotencyClaim | None
    future: asyncio.Future[AppendResult]
    after: tuple[AppendRequest, ...] = ()
    """Earlier requests whose outcome this one was decided on: it commits only if they all did."""
    outcome: AppendResult | Exception | None = None
    """Set when the batch settles, whether or not anyone still awaits the future."""
    on_settle: Callable[[AppendRequest], None] | None = None
    fresh: bool = False
    """Its events' ids were made for it and its caller decides again on a WrongExpectedVersion."""
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        return isinstance(self.outcome, AppendResult)


@dataclass(slots=True)
class Planned:
    """One event that the batch will insert."""

    position: int
    stream_id: str
    version: int
    event: EncodedEvent
    recorded_at: datetime
    hash: bytes


class KnownHeads:
    """What this process knows of the log: a head, and the (version, hash) its streams had.

    Learnt from its own appends, from reads (`seen`), and (with several workers) from the process's
    log tail, which hands it every process's appends in order (`follow`). Every entry is committed
    history, never ahead of the database, but may be behind it; the head is never ahead of the log's
    either. The fenced path checks in the database that each stream a batch writes is still where
    the entry says (migration 0010), so a stale entry costs a round trip, never a wrong append."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self.head: int | None = None
        self.recorded_at: datetime | None = None
        self.streams: dict[str, tuple[int, bytes]] = {}
        self.followed = False
        """The log tail hands this process every append (`follow`): it fills what lies below a batch
        of this process that committed above the head it knew, instead of that batch forgetting it all."""

    def lookup(self, stream_ids: set[str]) -> dict[str, tuple[int, bytes]] | None:
        try:
            return {s: self.streams[s] for s in stream_ids}
        except KeyError:
            return None

    def advance(self, planner: BatchPlanner, stream_ids: set[str], base: int) -> None:
        """A batch planned on the log at `base` committed, leaving the log at planner.head."""
        if self.head is not None and self.head >= planner.head:
            return  # the log tail handed this process the batch already (and perhaps more)
        streams = self.streams
        jump = self.head == base or self.head is None or not self.followed
        if jump and self.head != base:
            streams.clear()  # someone else appended between what we knew and `base`
        for stream in stream_ids:
            # Without a jump the batch's streams are ahead of the head until the tail hands over what
            # lies between: harmless, as the fence at the head then fails and every use is checked.
            streams[stream] = planner.streams.get(stream, (0, GENESIS))
        if len(streams) > self.capacity:
            streams.clear()
        if jump:
            self.head = planner.head
            self.recorded_at = planner.recorded_at

    def follow(self, events: Sequence[RecordedEvent], end: int) -> bool:
        """A contiguous run of the log up to `end` (the log tail's page): the streams it touched move on,
        and the head with them, when the run starts at or below this head. Whether it did."""
        self.followed = True
        head = self.head
        if head is None or end <= head or not events:
            return False
        if events[0].position > head + 1:  # the tail skipped what this process has not seen
            self.forget()
            return False
        streams = self.streams
        for event in events:
            if event.position > head:
                streams[event.stream_id] = (event.version, event.hash)
        if len(streams) > self.capacity:
            streams.clear()
        self.head = end
        last = events[-1].recorded_at
        if self.recorded_at is None or last > self.recorded_at:
            self.recorded_at = last
        return True

    def knows(self, stream_id: str, version: int) -> bool:
        """As of this process's last append (or a read at that head), the stream was at this version."""
        known = self.streams.get(stream_id) if self.head is not None else None
        return known is not None and known[0] == version

    def seen(self, head: int, streams: dict[str, tuple[int, bytes]]) -> None:
        """Stream heads a read found at log head `head`. At this process's head they are exact; read at
        another head they are still committed history, and the fence checks each stream a batch writes
        in the database (migration 0010), so a newer version than the one known is kept: a command
        decided again on what it read then plans from memory too, instead of taking the locked path."""
        known = self.streams
        if head == self.head:
            known.update(streams)
        elif self.head is not None:
            for stream, seen in streams.items():
                current = known.get(stream)
                if current is None or current[0] < seen[0]:
                    known[stream] = seen
        if len(known) > self.capacity:
            known.clear()

    def forget(self) -> None:
        self.head = None
        self.recorded_at = None
        self.streams.clear()


def predecessor_failed(request: AppendRequest, streams: dict[str, tuple[int, bytes]]) -> PredecessorFailed:
    """The refusal of a request decided on the state an append that did not commit would have left."""
    stream_id, expected = (request.writes[0].stream_id, request.writes[0].expected_version) \
        if request.writes else ("", ANY)
    return PredecessorFailed(stream_id, expected, streams.get(stream_id, (0, GENESIS))[0])


class BatchPlanner:
    """Decides, request by request, what a batch inserts, tracking streams as the batch advances them."""

    def __init__(
        self,
        streams: dict[str, tuple[int, bytes]],
        head: int,
        last_recorded_at: datetime | None,
        known: dict[uuid.UUID, tuple[int, str, int, str, bytes]] | None = None,
        used_keys: list[StoredOutcome] = (),  # type: ignore[assignment]
    ):
        self.streams = dict(streams)
        self.head = head
        now = datetime.now(UTC)
        # recorded_at never goes backwards along the log, even if this host's clock lags another's.
        self.recorded_at = max(now, last_recorded_at) if last_recorded_at else now
        # event_id -> (position, stream_id, version, type, data bytes) of events already stored or planned
        self.known = dict(known or {})
        self.rows: list[Planned] = []
        self.used_keys = {(r.scope, r.key): r for r in used_keys}
        self.responses: list[StoredOutcome] = []
        self._planned: dict[int, bool] = {}  # id(request) -> accepted, for the requests of this batch

    @classmethod
    def from_state(cls, rows: list[asyncpg.Record]) -> BatchPlanner:
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
        failed = self._predecessor_failed(request) if request.after else None
        outcome = self._plan(request) if failed is None else failed
        self._planned[id(request)] = isinstance(outcome, AppendResult)
        return outcome

    def skip(self, request: AppendRequest) -> None:
        """The request is not planned in this batch (it goes elsewhere): whoever depends on it fails here."""
        self._planned[id(request)] = False

    def _predecessor_failed(self, request: AppendRequest) -> PredecessorFailed | None:
        """A predecessor is either earlier in this batch (as planned so far) or in a batch that has
        settled (batches run one at a time, in the order requests were queued)."""
        for earlier in request.after:
            if not self._planned.get(id(earlier), earlier.committed):
                return predecessor_failed(request, self.streams)
        return None

    def _plan(self, request: AppendRequest) -> AppendResult | Exception:
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
        response = claim.record(result) if claim is not None else None
        self._accept(planned, streams)
        if response is not None:
            self.used_keys[(response.scope, response.key)] = response
            self.responses.append(response)
        return result

    def _propose(
        self, request: AppendRequest
    ) -> tuple[AppendResult, list[Planned], dict[str, tuple[int, bytes]]] | Exception:
        """Positions, versions and hashes for the request's events, without changing the batch yet."""
        streams: dict[str, tuple[int, bytes]] = {}
        planned: list[Planned] = []
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
                planned.append(Planned(position, write.stream_id, version, event, self.recorded_at, previous))
                positions.append(position)
            streams[write.stream_id] = (version, previous)
            results.append(StreamAppended(write.stream_id, tuple(positions), version))
        return AppendResult(tuple(results)), planned, streams

    def _accept(self, planned: list[Planned], streams: dict[str, tuple[int, bytes]]) -> None:
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

    def event_rows(self) -> list[list[object]]:
        """The planned events as `event_rows` of tally_insert_appended (migration 0006): one jsonb
        parameter, not one array per column (asyncpg checks each array element in Python)."""
        return [
            [r.position, r.stream_id, r.version, r.event.type, orjson.Fragment(r.event.data),
             orjson.Fragment(r.event.metadata), r.event.event_id, r.recorded_at, r.hash.hex()]
            for r in self.rows
        ]
