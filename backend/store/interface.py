"""What an event store promises its callers: the repository, the command bus and the log's readers.

`backend.store.event_store.EventStore` (PostgreSQL) is the one production store. The type exists so that
callers depend on the contract rather than on that class, and so that the tests can run the command
handlers over an in-memory store held to the same contract tests (tests/memory_store.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from backend.store.event_store import StoreCounters
from backend.store.events import AppendResult, NewEvent, RecordedEvent, Write
from backend.store.idempotency import IdempotencyClaim, StoredOutcome
from backend.store.planner import AppendRequest


class Snapshots(Protocol):
    """Folded state kept to save work, never a source of truth."""

    async def latest(self, stream_id: str) -> tuple[int, dict[str, Any]] | None: ...

    async def save(self, stream_id: str, version: int, type_name: str, payload_json: str) -> None: ...


class EventLog(Protocol):
    """Appends (atomic over streams, with expected versions, idempotent by event id and by claim) settle
    in the order they were submitted; positions are gap-free, and a read never skips one. The guarantees
    are spelled out in docs/ARCHITECTURE.md, "The append protocol"."""

    @property
    def snapshots(self) -> Snapshots: ...

    async def append(self, writes: Sequence[Write], claim: IdempotencyClaim | None = None) -> AppendResult: ...

    async def append_to(self, stream_id: str, expected_version: int, events: Sequence[NewEvent]) -> AppendResult: ...

    def submit(
        self,
        writes: Sequence[Write],
        claim: IdempotencyClaim | None = None,
        *,
        after: Sequence[AppendRequest] = (),
        on_settle: Callable[[AppendRequest], None] | None = None,
        fresh: bool = False,
    ) -> AppendRequest:
        """Queue an append without waiting; with `after`, it commits only if those did. `fresh`: its
        events' ids were made for it (none can be stored yet) and a WrongExpectedVersion is answer
        enough, even with a claim, because the caller decides again and the key is checked then."""
        ...

    async def outcome(self, request: AppendRequest) -> AppendResult:
        """The result of a submitted append, or its exception."""
        ...

    async def settled(self, request: AppendRequest) -> None: ...

    def knows(self, stream_id: str, version: int) -> bool:
        """This process last saw the stream at this version, and nobody else has appended since."""
        ...

    def follow(self, events: Sequence[RecordedEvent], end: int) -> bool:
        """Another process's appends, in order, up to `end`: the known stream heads move on with them.
        Whether they did."""
        ...

    async def stored_outcome(self, scope: str, key: str) -> StoredOutcome | None: ...

    async def read_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> list[RecordedEvent]: ...

    async def read_tail(self, stream_id: str, after_version: int) -> list[RecordedEvent]: ...

    async def stream_version(self, stream_id: str) -> int: ...

    async def read_all(
        self,
        after_position: int = 0,
        limit: int = ...,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
    ) -> list[RecordedEvent]: ...

    def iter_all(
        self,
        after_position: int = 0,
        types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
        page_size: int = ...,
        to_position: int | None = None,
    ) -> AsyncIterator[RecordedEvent]: ...

    def iter_stream(
        self, stream_id: str, after_version: int = 0, to_version: int | None = None
    ) -> AsyncIterator[RecordedEvent]: ...

    async def head(self) -> int: ...

    def counters(self) -> StoreCounters: ...

    async def close(self) -> None: ...
