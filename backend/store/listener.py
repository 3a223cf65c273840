"""One LISTEN connection per process: knows the log's head and wakes whoever waits for it to move.

A NOTIFY only says "the head moved to P"; waiters always re-read from their own position, so a lost
notification costs latency, never an event. The connection also polls the head on a timer (which
doubles as its liveness check). One connection's lifetime is one run of a supervised job: whatever
ends it (a drop, a protocol error after a server restart, a bug) makes the Supervisor start another
with backoff, and each new connection wakes every waiter so that they re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import asyncpg

from backend.store.append import NOTIFY_CHANNEL
from backend.store.reads import HEAD_SQL
from backend.supervisor import Supervised, Supervisor

log = logging.getLogger(__name__)

TASK_NAME = "listener"


class Listener:
    def __init__(self, dsn: str, *, poll_interval_s: float = 1.0, connect_kwargs: dict[str, Any] | None = None,
                 supervisor: Supervisor | None = None):
        self._dsn = dsn
        self._poll_interval_s = poll_interval_s
        self._connect_kwargs = connect_kwargs or {}
        self.head = 0
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._changed = asyncio.Event()
        self._lost = asyncio.Event()
        self._supervisor = supervisor if supervisor is not None else Supervisor()
        self._job: Supervised | None = None
        self._conn: asyncpg.Connection | None = None

    async def start(self, timeout: float = 10.0) -> None:
        self._job = self._supervisor.spawn(TASK_NAME, self._run)
        try:
            async with asyncio.timeout(timeout):
                await self.connected.wait()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening; never raises, whatever the connection went through."""
        job, self._job = self._job, None
        await self._supervisor.stop(job)
        self._wake()

    def backend_pid(self) -> int | None:
        """The server process of the LISTEN connection (tests terminate it)."""
        return self._conn.get_server_pid() if self._conn is not None and not self._conn.is_closed() else None

    async def wait_beyond(self, position: int, timeout: float) -> int:
        """Wait until the head passes position or timeout runs out; return the head."""
        deadline = time.monotonic() + timeout
        while self.head <= position:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            changed = self._changed
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation of the waiter
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()
        return self.head

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _advance(self, position: int) -> None:
        if position > self.head:
            self.head = position
            self._wake()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        with contextlib.suppress(ValueError):
            self._advance(int(str(payload)))

    def _on_terminated(self, conn: object) -> None:
        self._lost.set()

    async def _run(self) -> None:
        """One connection, from connect until it is lost (raised, for the Supervisor to start another)."""
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(self._dsn, **self._connect_kwargs)
            self._lost.clear()
            conn.add_termination_listener(self._on_terminated)
            await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
            self._conn = conn
            self.head = max(self.head, int(await conn.fetchval(HEAD_SQL)))
            if self.connected.is_set():
                self.reconnects += 1
                log.info("event listener reconnected", extra={"head": self.head})
            self.connected.set()
            self._wake()  # anything may have been missed while disconnected: everyone re-reads
            while not self._lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), self._poll_interval_s)
                if not self._lost.is_set():
                    self._advance(int(await conn.fetchval(HEAD_SQL)))
            raise ConnectionError("listener connection lost")
        finally:
            self._conn = None
            if conn is not None and not conn.is_closed():
                conn.terminate()
