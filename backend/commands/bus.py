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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from eventsourcing.domain import Aggregate

from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands.context import CommandContext
from backend.commands.errors import CommandError, IdempotencyConflict, IdempotencyInFlight, TooMuchContention
from backend.commands.locks import StreamLocks
from backend.commands.outcome import Outcome, Refusal, decode, encode_answer, encode_refusal
from backend.domain.errors import DomainError
from backend.store.events import Write, WrongExpectedVersion
from backend.store.idempotency import IdempotencyClaim, IdempotencyKeyUsed, StoredOutcome
from backend.store.repository import Repository

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """What a command decided: the aggregates whose pending events to append, and its answer."""

    aggregates: Sequence[Aggregate]
    body: dict[str, Any] = field(default_factory=dict)
    extra_writes: Sequence[Write] = ()
    """Writes to non-aggregate streams appended atomically with the aggregates (e.g. uniqueness claims)."""


Check = Callable[[Mapping[str, Any]], None]
"""The caller's check of a decision's answer, before anything is appended (HTTP's: that it fits what
the endpoint documents); raising refuses the command and appends nothing."""


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    scope: str
    key: str
    fingerprint: bytes


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
        self, ctx: CommandContext, command: Command, idem: IdempotencyKey | None = None, check: Check | None = None
    ) -> Outcome:
        """Execute a command message on the streams it declares (a Call's, as they are: no coroutine
        around its streams or its decision)."""
        if type(command) is Call:
            return await self.execute(ctx, command.on, command.decision, idem, check)
        return await self.execute(ctx, await command.streams(), command.decide, idem, check)

    async def execute(
        self,
        ctx: CommandContext,
        streams: Sequence[str],
        decide: Decide,
        idem: IdempotencyKey | None = None,
        check: Check | None = None,
    ) -> Outcome:
        """Decide and append on `streams`; the answer, or a replay of the key's kept outcome. A domain
        rule's refusal is raised (and, with a key, kept first)."""
        if idem is None:
            return await self._run(ctx, streams, decide, None, check)
        slot = (idem.scope, idem.key)
        if slot in self._in_flight:
            raise IdempotencyInFlight("a request with this Idempotency-Key is still being processed")
        self._in_flight.add(slot)
        try:
            return await self._run(ctx, streams, decide, idem, check)
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
        self, ctx: CommandContext, streams: Sequence[str], decide: Decide, idem: IdempotencyKey | None,
        check: Check | None,
    ) -> Outcome:
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
                        return await self._store_failure(idem, Refusal.of(error, ctx.request_id), error)
                if optimistic and not _checked_by_append(decision):
                    optimistic = False
                    continue
                if check is not None:
                    check(decision.body)
                claim = IdempotencyClaim(idem.scope, idem.key, idem.fingerprint, encode_answer(decision.body)) \
                    if idem else None
                staged = self.repository.stage(*decision.aggregates, metadata=ctx.metadata(), claim=claim,
                                               extra_writes=decision.extra_writes, trust=trust)
            try:
                result = await self.repository.committed(staged)
            except WrongExpectedVersion:
                # Another process got there first (or an append this one followed did not commit): decide
                # again, as optimistically as before. A cached copy the loss showed stale is not trusted
                # any more (the stream's known head has moved past it), so it is read; and this
                # process's appends still in flight on these streams were all decided after the loss
                # (those decided on the lost one failed with it), so the retry chains on them instead of
                # waiting a batch for them to commit. A little jitter keeps two losers apart.
                self.conflicts += 1
                now = self.clock.now()
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 10)))  # noqa: S311 (jitter)
                continue
            except IdempotencyKeyUsed as used:
                assert idem is not None
                return replay(used.stored, idem)
            return Outcome(decision.body, result.position)
        raise TooMuchContention(f"gave up after {self.max_attempts} conflicting attempts; nothing was changed")

    async def _store_failure(self, idem: IdempotencyKey, refusal: Refusal, error: DomainError) -> Outcome:
        """Commit a domain rejection as the key's outcome, so a repeat gets the same answer."""
        claim = IdempotencyClaim(idem.scope, idem.key, idem.fingerprint, encode_refusal(refusal))
        try:
            await self.repository.store.append([], claim)
        except IdempotencyKeyUsed as used:
            return replay(used.stored, idem)
        raise error


def _checked_by_append(decision: Decision) -> bool:
    """Every aggregate the decision answers with appends, so its expected version vouches for the
    state the command saw (a cached copy, on an optimistic attempt): a stale one fails the append."""
    return bool(decision.aggregates) and all(aggregate.pending_events for aggregate in decision.aggregates)


def replay(stored: StoredOutcome, idem: IdempotencyKey) -> Outcome:
    if stored.fingerprint != idem.fingerprint:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request")
    return decode(stored.outcome, stored.position)
