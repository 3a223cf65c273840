"""Running one projection: lead or stand by, catch up, follow the log live, survive bad events.

Leadership: the runner holds its own connection and takes the projection's session advisory lock on
it (leader.py). Without the lock it stands by, trying again every `standby_retry_s`; the lock is
released when the leader's connection closes, so a standby takes over within a retry interval of
the leader's death. Every write of a leader goes through that same connection (its reads of the newest
events come from the process's log tail, see feed.py), so a runner that has lost its lock (its
connection is gone) cannot write anything more.

Following the log: read up to `batch_size` handled events after the checkpoint, with the head (one
query, or from the process's feed of the newest events, which its one log tail fills: feed.py); in
ONE transaction fence the checkpoint row and advance it (to the last event, or to the head when the
batch was not full: the store's readers-never-skip guarantee means everything up to that head has been
seen), and apply the batch. So each event takes effect exactly once, whatever crashes. When caught up,
wait for the feed to move (or, without one, the Listener's NOTIFY) or the poll timer, whichever comes
first.

Most steps of most runners find nothing to apply (the new events are of types the projection does not
handle): such a step moves the checkpoint in memory at once, which is what this process's readers wait
on (on_advance), and writes it to the table at most every `idle_checkpoint_s`, and when the runner
falls idle. Under load that saves each such runner dozens of writes a second; it costs readers in
other processes, which poll the table, at most that interval on positions the projection has no
events for, and a crash only re-examines those events.

Pacing: were a runner that keeps up to apply a batch as soon as the log moves, under a steady stream
of appends each batch would hold the few events of one append batch, and each cost a transaction with
its round trips. After a batch it applied, a runner that has caught up lets `apply_interval_s` pass
before it applies the next one: under load its batches grow and its transactions become fewer,
at the price of up to that interval more before a read-your-writes read sees a new event. A lone
append after a quiet spell is applied at once, and a runner behind (its batch was full) never waits.

Lost connections: one connection's lifetime is one run of the runner, supervised (backend.supervisor):
a lost connection, a protocol error after a server restart, or a bug ends the run and with it the
lead; the Supervisor starts another with backoff.

Failures: if a batch fails, its events are applied one per transaction up to the one that fails;
that event's position and error are logged and recorded in projection_checkpoints (status shows
them), and the runner retries it with exponential backoff. Other projections carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncpg

from backend.config import Settings
from backend.db import Connection, describe, is_unavailable
from backend.store.listener import Listener
from projections import checkpoints, leader
from projections.base import Projection
from projections.events import Event, read_to_head
from projections.feed import LogFeed
from projections.leader import Connect

log = logging.getLogger(__name__)

OnAdvance = Callable[[str, int], None]

STARTING, STANDBY, LEADING, FAILED, STOPPED = "starting", "standby", "leading", "failed", "stopped"


def lost(exc: BaseException) -> bool:
    """The connection is gone (or unusable): end the run rather than blame an event."""
    return is_unavailable(exc)


ANALYZE_FIRST_AT = 1000
"""Events a leading runner applies before it first refreshes its tables' statistics; again at every
doubling of that count (see Runner._refresh_statistics)."""


async def analyze(conn: Connection, tables: Sequence[str], schema: str = "public") -> None:
    """Refresh the planner's statistics of these tables (ANALYZE blocks neither reads nor writes)."""
    for table in tables:
        await conn.execute(f"analyze {schema}.{table}")


class ProjectionFailed(Exception):
    def __init__(self, position: int | None, error: BaseException) -> None:
        super().__init__(f"failed at position {position}: {describe(error)}")
        self.position = position
        self.error = error


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    """How a runner paces itself: its batch, its waits and its backoff (the PROJECTION_* settings)."""

    batch_size: int = 1000
    poll_s: float = 1.0
    standby_retry_s: float = 1.0
    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    idle_checkpoint_s: float = 0.2
    apply_interval_s: float = 0.0
    """While caught up, at least this long between a batch it applied and the next (see Pacing)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerConfig:
        return cls(
            batch_size=settings.projection_batch_size,
            poll_s=settings.projection_poll_s,
            standby_retry_s=settings.projection_standby_retry_s,
            max_backoff_s=settings.projection_max_backoff_s,
            idle_checkpoint_s=settings.projection_idle_checkpoint_s,
            apply_interval_s=settings.projection_apply_interval_s,
        )


class Runner:
    def __init__(
        self,
        projection: Projection,
        connect: Connect,
        config: RunnerConfig = RunnerConfig(),
        *,
        listener: Listener | None = None,
        on_advance: OnAdvance | None = None,
        feed: LogFeed | None = None,
    ) -> None:
        self.projection = projection
        self.name = projection.name
        self.types = sorted(projection.types) if projection.types is not None else None
        self._connect = connect
        self.listener = listener
        self.config = config
        self.on_advance = on_advance
        self.feed = feed
        """The process's newest events, from its log tail (None: this runner reads alone)."""
        self._applied_at = -config.apply_interval_s
        self.state = STARTING
        self.checkpoint = 0
        """Every event up to here has been applied (or is not of the projection's types)."""
        self.written = 0
        """The checkpoint as the table has it: a step that applies nothing may leave it behind."""
        self._written_at = 0.0
        self.checkpoint_writes = 0
        self.applied = 0
        self._analyze_at = ANALYZE_FIRST_AT
        self.error: str | None = None
        self.failed_position: int | None = None
        self.backend_pid: int | None = None
        """Server pid of the runner's connection (tests terminate it to simulate a crash)."""
        self.stopping = False
        """Set by stop(): a cancellation can be lost (Python 3.11's wait_for may swallow one), this cannot."""

    # ------------------------------------------------------------------ leadership

    async def run(self) -> None:
        """One connection's lifetime: connect, win the lock (or stand by), lead until stopped.

        Whatever ends it early (a lost connection, a bug) is raised, for the Supervisor to start
        another run with backoff; the connection, and with it the lead, goes at once."""
        try:
            if not self.stopping:
                async with leader.leading(self._connect, f"tally-projection-{self.name}-{os.getpid()}", leader.LEADER,
                                          self.name, self.config.standby_retry_s, connected=self._connected,
                                          standing_by=self._standing_by) as conn:
                    self.state = LEADING
                    log.info("projection runner leads", extra={"projection": self.name})
                    with self.feed.leading() if self.feed is not None else contextlib.nullcontext():
                        await self._lead(conn)
            self.state = STOPPED
        except asyncio.CancelledError:
            self.state = STOPPED
            raise
        except Exception:
            self.state = STANDBY
            raise
        finally:
            self.backend_pid = None

    def _connected(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        self.backend_pid = conn.get_server_pid()

    def _standing_by(self) -> None:
        self.state = STANDBY

    async def _lead(self, conn: Connection) -> None:
        await self._load_checkpoint(conn)
        backoff = self.config.min_backoff_s
        while not self.stopping:
            if conn.is_closed():  # the lead went with it; an idle runner reads the feed, never the session
                raise ConnectionError("projection session lost")
            try:
                full = await self._step(conn)
            except ProjectionFailed:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.max_backoff_s)
                continue
            backoff = self.config.min_backoff_s
            if self.applied >= self._analyze_at:
                await self._refresh_statistics(conn)
            if not full:
                await self._write_checkpoint_when_due(conn)
                await self._idle(await self._tick(conn))
                await self._pace()

    # ------------------------------------------------------------------ following the log

    async def _load_checkpoint(self, conn: Connection) -> None:
        self.checkpoint = self.written = await checkpoints.load(conn, self.name)
        self.projection.resume()
        self._advanced()

    async def _reload(self, conn: Connection, fenced: checkpoints.Fenced) -> None:
        log.info("projection checkpoint moved, reloading", extra={"projection": self.name, "detail": str(fenced)})
        await self._load_checkpoint(conn)

    async def _step(self, conn: Connection) -> bool:
        """Apply the next batch; True when it was full (more may be waiting)."""
        events, target = await self._read(conn)
        full = len(events) == self.config.batch_size
        if target <= self.checkpoint:
            return False
        try:
            await self._commit(conn, events, target)
        except checkpoints.Fenced as fenced:
            await self._reload(conn, fenced)
            return True
        except Exception as exc:
            if lost(exc):
                raise
            await self._isolate(conn, events, exc)
            return True
        return full

    async def _read(self, conn: Connection) -> tuple[list[Event], int]:
        """The next batch after the checkpoint, and the position up to which the log was examined for
        it: the last event's when the batch is full, else the head (nothing up to it was left out)."""
        if self.feed is not None:
            found = self.feed.after(self.checkpoint, self.config.batch_size, self.projection.types)
            if found is not None and not self._feed_stalled(found[1]):
                return found
        events, head = await read_to_head(conn, self.checkpoint, self.config.batch_size, self.types)
        if len(events) == self.config.batch_size:
            return events, events[-1].position
        return events, max(head, events[-1].position if events else 0)

    def _feed_stalled(self, end: int) -> bool:
        """The log has moved past the feed's end, and the feed has stood still for `poll_s`: its tail is
        down or stuck (its backoff), so this runner reads the store itself meanwhile."""
        assert self.feed is not None
        return self.listener is not None and self.listener.head > end and self.feed.still_for() > self.config.poll_s

    async def _commit(self, conn: Connection, events: Sequence[Event], target: int) -> None:
        """Apply events and move the checkpoint to target, both or neither (fenced: see checkpoints)."""
        if events:
            await checkpoints.begin_batch(conn, self.name, self.written, target)
            try:
                await self.projection.apply(conn, events)
                await conn.execute("commit")
            except BaseException:
                await checkpoints.rollback(conn)
                raise
            self._wrote(target)
            self._applied_at = self._written_at
        elif self._write_due() <= 0:
            await checkpoints.advance_from(conn, self.name, self.written, target)
            self._wrote(target)
        self.checkpoint = target
        self.applied += len(events)
        if self.state == FAILED:
            log.info("projection recovered", extra={"projection": self.name, "position": target})
            self.state, self.error, self.failed_position = LEADING, None, None
        self._advanced()

    def _wrote(self, position: int) -> None:
        self.written = position
        self._written_at = time.monotonic()
        self.checkpoint_writes += 1

    def _write_due(self) -> float:
        """Seconds until the checkpoint may be written again after a step that applied nothing."""
        return self._written_at + self.config.idle_checkpoint_s - time.monotonic()

    async def _write_checkpoint_when_due(self, conn: Connection) -> None:
        """Write the checkpoint that steps with nothing to apply left in memory, once it is due."""
        if self.written < self.checkpoint and self._write_due() <= 0:
            try:
                await checkpoints.advance_from(conn, self.name, self.written, self.checkpoint)
            except checkpoints.Fenced as fenced:
                await self._reload(conn, fenced)
                return
            self._wrote(self.checkpoint)

    async def _isolate(self, conn: Connection, events: Sequence[Event], batch_error: Exception) -> None:
        """Apply the batch one event per transaction, to pin the failure on the event that causes it."""
        for event in events:
            try:
                await self._commit(conn, [event], event.position)
            except checkpoints.Fenced:
                return  # the next step reloads
            except Exception as exc:
                if lost(exc):
                    raise
                await self._fail(conn, event, exc)
        if not events:
            await self._fail(conn, None, batch_error)
        log.warning("a batch failed but each of its events applied on its own",
                    extra={"projection": self.name, "error": describe(batch_error)})

    async def _fail(self, conn: Connection, event: Event | None, error: Exception) -> None:
        position = event.position if event is not None else None
        self.state, self.error, self.failed_position = FAILED, describe(error), position
        log.error(
            "projection failed on an event; retrying with backoff",
            extra={"projection": self.name, "position": position, "event_type": event.type if event else None,
                   "stream_id": event.stream_id if event else None, "error": describe(error)},
        )
        with contextlib.suppress(Exception):
            await checkpoints.record_failure(conn, self.name, position, describe(error))
        raise ProjectionFailed(position, error) from error

    async def _refresh_statistics(self, conn: Connection) -> None:
        """ANALYZE this projection's tables after 1,000, 2,000, 4,000... events applied.

        Each connection prepares a statement once, and PostgreSQL soon settles on a generic plan made
        for the tables' size at that moment: a sequential scan joined to the batch is right for a new,
        small table and stays in use, scanning more each batch, until the statistics change. Autovacuum
        would change them, but it may be disabled, as on the bench machine, where under `bench.py http`
        the reservations runner read that whole table many times a second. Doubling keeps the number of
        ANALYZEs logarithmic in the events applied."""
        self._analyze_at = max(self._analyze_at, self.applied) * 2
        try:
            await analyze(conn, self.projection.tables)
        except Exception as exc:
            if lost(exc):
                raise
            log.warning("refreshing a projection's statistics failed", extra={"projection": self.name,
                                                                               "error": describe(exc)})

    async def _tick(self, conn: Connection) -> float | None:
        try:
            return await self.projection.tick(conn)
        except Exception as exc:
            if lost(exc):
                raise
            log.warning("projection tick failed", extra={"projection": self.name, "error": describe(exc)},
                        exc_info=True)
            return self.config.max_backoff_s / 10

    async def _pace(self) -> None:
        """Wait out what is left of `apply_interval_s` since the last batch applied (see Pacing)."""
        rest = self._applied_at + self.config.apply_interval_s - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)

    async def _idle(self, delay: float | None) -> None:
        """Sleep until the log moves past the checkpoint, the poll timer fires, or `delay` is over."""
        timeout = self.config.poll_s if delay is None else max(0.0, min(self.config.poll_s, delay))
        if self.written < self.checkpoint:  # wake to write it
            timeout = max(0.0, min(timeout, self._write_due()))
        if timeout <= 0:
            return
        if self.feed is not None:
            await self.feed.wait_beyond(self.checkpoint, timeout)
        elif self.listener is not None:
            await self.listener.wait_beyond(self.checkpoint, timeout)
        else:
            await asyncio.sleep(timeout)

    def _advanced(self) -> None:
        if self.on_advance is not None:
            self.on_advance(self.name, self.checkpoint)
