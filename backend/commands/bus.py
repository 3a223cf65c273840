"""Running a command: lock its streams, decide, append with expected versions, retry on conflict,
and honour Idempotency-Key (the first outcome is committed with the events and replayed on repeats).

The first attempt is optimistic: it decides on this process's own state of its streams without reading
them (Repository.attempt): the cached aggregates when this process appended last to them, or the
state its appends still in flight will leave. That saves a round trip per command, and commands on one
hot wallet do not wait for each other's commit. It is safe because the answer only stands if the
append succeeds with those versions as expected versions and every in-flight append it followed
committed too; a rejection, or an answer no append would check, is decided again on what the store
holds before it is given.

A repeated key costs nothing extra on the common path: the append checks the key under the store's
lock and answers with the stored outcome instead of appending (IdempotencyKeyUsed), so the decision
is simply re-made and thrown away. Only when the command cannot run at all is the key looked up.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from eventsourcing.domain import Aggregate

from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands.context import CommandContext
from backend.commands.errors import CommandError, IdempotencyConflict, IdempotencyInFlight, TooMuchContention
from backend.commands.locks import StreamLocks
from backend.domain.errors import DomainError
from backend.store.events import AppendResult, Write, WrongExpectedVersion
from backend.store.idempotency import IdempotencyClaim, IdempotencyKeyUsed, StoredResponse
from backend.store.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """What a command decided: the aggregates whose pending events to append, and its answer."""

    aggregates: Sequence[Aggregate]
    body: dict[str, Any] = field(default_factory=dict)
    extra_writes: Sequence[Write] = ()
    """Writes to non-aggregate streams appended atomically with the aggregates (e.g. uniqueness claims)."""


Rendered = tuple[int, bytes, str]
Respond = Callable[[int], Rendered]
"""A success already rendered but for its position: fills the position in without rendering."""


class Renderer(Protocol):
    """Turns outcomes into response bytes (the HTTP layer's job; stored as-is for replays)."""

    def success(self, decision: Decision, result: AppendResult) -> Rendered: ...

    def prepare(self, decision: Decision) -> Respond:
        """Render a success before its append, for an Idempotency-Key to store: the append then only
        fills in the position, so nothing renders under the store's lock."""
        ...

    def failure(self, error: DomainError) -> Rendered: ...


class Quiet:
    """A renderer for callers with no client to answer (process managers, tests, benchmarks)."""

    def success(self, decision: Decision, result: AppendResult) -> tuple[int, bytes, str]:
        return 200, b"", "application/json"

    def prepare(self, decision: Decision) -> Respond:
        return lambda _position: (200, b"", "application/json")

    def failure(self, error: DomainError) -> tuple[int, bytes, str]:
        return 409, b"", "application/json"


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    scope: str
    key: str
    fingerprint: bytes


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str
    position: int
    replayed: bool = False


Decide = Callable[[CommandContext], Awaitable[Decision]]


class Command(Protocol):
    """A command as a message: the streams it touches (locked while it runs) and its decision. Its
    dependencies (repository, secrets) are given when it is built, not looked up by its caller."""

    async def streams(self) -> Sequence[str]: ...

    async def decide(self, ctx: CommandContext) -> Decision: ...


@dataclass(frozen=True, slots=True)
class Call:
    """A command whose streams are known without reading anything."""

    on: Sequence[str]
    decision: Decide

    async def streams(self) -> Sequence[str]:
        return self.on

    async def decide(self, ctx: CommandContext) -> Decision:
        return await self.decision(ctx)


class CommandBus:
    def __init__(self, repository: Repository, *, max_attempts: int = 25, optimistic: bool = True,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self.repository = repository
        self.clock = clock
        """A retry decides again at this clock's now (the first attempt at the context's)."""
        self.max_attempts = max_attempts
        self.optimistic = optimistic
        self.locks = StreamLocks()
        self._in_flight: set[tuple[str, str]] = set()
        self.conflicts = 0

    async def run(
        self, ctx: CommandContext, command: Command, renderer: Renderer, idem: IdempotencyKey | None = None
    ) -> Reply:
        """Execute a command message on the streams it declares (a Call's, as they are: no coroutine
        around its streams or its decision)."""
        if type(command) is Call:
            return await self.execute(ctx, command.on, command.decision, renderer, idem)
        return await self.execute(ctx, await command.streams(), command.decide, renderer, idem)

    async def execute(
        self,
        ctx: CommandContext,
        streams: Sequence[str],
        decide: Decide,
        renderer: Renderer,
        idem: IdempotencyKey | None = None,
    ) -> Reply:
        if idem is None:
            return await self._run(ctx, streams, decide, renderer, None)
        slot = (idem.scope, idem.key)
        if slot in self._in_flight:
            raise IdempotencyInFlight("a request with this Idempotency-Key is still being processed")
        self._in_flight.add(slot)
        try:
            return await self._run(ctx, streams, decide, renderer, idem)
        except CommandError:
            # The command could not run now (not found, forbidden, If-Match...). If the key already has
            # an outcome, that outcome is the answer: the first attempt ran when the command could.
            stored = await self.repository.store.stored_outcome(idem.scope, idem.key)
            if stored is not None:
                return replay(stored, idem)
            raise
        finally:
            self._in_flight.discard(slot)

    async def _run(
        self, ctx: CommandContext, streams: Sequence[str], decide: Decide, renderer: Renderer,
        idem: IdempotencyKey | None,
    ) -> Reply:
        optimistic = self.optimistic
        now = ctx.now
        for attempt in range(self.max_attempts):
            # The locks cover deciding and submitting the append, not its commit: the next command on
            # these streams decides on the state this one leaves, and commits only if this one does.
            async with self.locks.hold(streams):
                if not optimistic:  # decide on what the store holds, once this process's appends settled
                    await self.repository.settled(streams)
                with self.repository.attempt(optimistic) as trust:
                    try:
                        decision = await decide(ctx.at(now))
                    except (DomainError, CommandError) as error:
                        if optimistic:  # decided on state no append will check: read, decide again
                            optimistic = False
                            continue
                        if idem is None or not isinstance(error, DomainError):
                            raise
                        return await self._store_failure(idem, renderer.failure(error), error)
                if optimistic and not _checked_by_append(decision):
                    optimistic = False
                    continue
                render = _Rendering(renderer, decision, prepared=idem is not None)
                claim = IdempotencyClaim(idem.scope, idem.key, idem.fingerprint, render) if idem else None
                staged = self.repository.stage(*decision.aggregates, metadata=ctx.metadata(), claim=claim,
                                               extra_writes=decision.extra_writes, trust=trust)
            try:
                result = await self.repository.committed(staged)
            except WrongExpectedVersion:
                # Another process got there first (or an append this one followed did not commit). The
                # next attempt reads the streams' tails; a little jitter keeps two losers from colliding.
                self.conflicts += 1
                optimistic = False
                now = self.clock.now()
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 10)))  # noqa: S311 (jitter)
                continue
            except IdempotencyKeyUsed as used:
                assert idem is not None
                return replay(used.stored, idem)
            status, body, content_type = render.output or render(result)
            return Reply(status, body, content_type, result.position)
        raise TooMuchContention(f"gave up after {self.max_attempts} conflicting attempts; nothing was changed")

    async def _store_failure(
        self, idem: IdempotencyKey, rendered: tuple[int, bytes, str], error: DomainError
    ) -> Reply:
        """Commit a domain rejection as the key's outcome, so a repeat gets the same answer."""
        claim = IdempotencyClaim(idem.scope, idem.key, idem.fingerprint, lambda _result: rendered)
        try:
            await self.repository.store.append([], claim)
        except IdempotencyKeyUsed as used:
            return replay(used.stored, idem)
        raise error


def _checked_by_append(decision: Decision) -> bool:
    """Every aggregate the decision answers with appends, so its expected version vouches for the
    state the command saw (a cached copy, on an optimistic attempt): a stale one fails the append."""
    return bool(decision.aggregates) and all(aggregate.pending_events for aggregate in decision.aggregates)


class _Rendering:
    """Renders a success once: before the append when a claim must store it (the append only fills in
    the position), else after it."""

    def __init__(self, renderer: Renderer, decision: Decision, *, prepared: bool) -> None:
        self.renderer = renderer
        self.decision = decision
        self.respond = renderer.prepare(decision) if prepared else None
        self.output: Rendered | None = None

    def __call__(self, result: AppendResult) -> Rendered:
        if self.respond is not None and result.position >= 1:
            self.output = self.respond(result.position)
        else:  # no position to fill in: the renderer itself answers (or refuses) as it always has
            self.output = self.renderer.success(self.decision, result)
        return self.output


def replay(stored: StoredResponse, idem: IdempotencyKey) -> Reply:
    if stored.fingerprint != idem.fingerprint:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request")
    return Reply(stored.status, stored.body, stored.content_type, stored.position, replayed=True)
