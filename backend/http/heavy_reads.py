"""Heavy audit reads take turns: a read that keeps one pooled connection for as long as it replays the
whole log or a whole stream runs only when one of a few turns is free, and waits for it holding no
connection. Unbounded, as many such reads as POOL_MAX_SIZE, from one audit:read key, would hold every
connection: commands would wait and the process would be unready until they were done."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from backend.store.read_pools import ReadPools, Ready
from backend.store.reads import Executor

T = TypeVar("T")

WHOLE_LOG_VERIFICATIONS_AT_ONCE = 1
"""GET /v1/audit/verify without a stream: it reads every event of the log."""
STATE_REPLAYS_AT_ONCE = 1
"""GET /v1/wallets/{id}/state: it reads the wallet's whole stream, however long."""


class HeavyReads:
    """At most `at_once` reads at a time in this process; the turn is taken before the connection."""

    def __init__(self, at_once: int) -> None:
        self.at_once = at_once
        self._turns = asyncio.Semaphore(at_once)

    async def read(self, pools: ReadPools, fn: Callable[[Executor], Awaitable[T]], *, at_least: int = 0,
                   ready: Ready | None = None) -> T:
        """`pools.read(fn, ...)` once a turn is free: waiting for it holds no connection."""
        async with self._turns:
            return await pools.read(fn, at_least=at_least, ready=ready)
