"""Small helpers every test area shares: the typed test client of a Tally app, the one way to wait for
a state the code under test offers no event for, and the question "is an append waiting for the lock"."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import asyncpg
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient

Client = TestClient[web.Request, web.Application]
"""A client of a Tally app over a real socket; `client.app` is the app it serves."""

T = TypeVar("T")

What = str | Callable[[], str]
"""What a wait is for, for its failure message: a text, or a function that tells it then (a log, say)."""


def _timed_out(timeout: float, what: What) -> AssertionError:
    return AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")


@overload
async def eventually(check: Callable[[], Awaitable[T | None]], *, timeout: float = ..., interval: float = ...,
                     what: What = ...) -> T: ...
@overload
async def eventually(check: Callable[[], T | None], *, timeout: float = ..., interval: float = ...,
                     what: What = ...) -> T: ...
async def eventually(check: Callable[[], Any], *, timeout: float = 15.0, interval: float = 0.02,
                     what: What = "the condition") -> Any:
    """Poll check (a function or a coroutine function) until it returns something truthy, and return that;
    fail naming `what` after timeout. Polling is for states nothing announces; it never stands in for a
    sleep, and a check that blocks is cut off by the same timeout."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                result = check()
                value = await result if inspect.isawaitable(result) else result
                if value:
                    return value
                await asyncio.sleep(interval)
    except TimeoutError:
        raise _timed_out(timeout, what) from None


def eventually_blocking(check: Callable[[], T | None], *, timeout: float = 30.0, interval: float = 0.1,
                        what: What = "the condition") -> T:
    """`eventually` for tests that drive processes without an event loop: the same contract, blocking."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what)
        time.sleep(interval)
    return value


def secret_of(key: str) -> str:
    """The secret part of an API key, tly_<key id>_<secret>: the secret (base64url) may itself hold "_"."""
    return key.split("_", 2)[2]


async def object_of(response: ClientResponse) -> dict[str, Any]:
    """The reply's JSON body, which must be an object (whatever its content type says)."""
    body = await response.json(content_type=None)
    assert isinstance(body, dict), body
    return body


async def advisory_lock_waiters(db: asyncpg.Pool | asyncpg.Connection) -> list[int]:
    """Server pids of this database's sessions waiting for an advisory lock: an append queued behind the
    store's lock (or behind a test holding it)."""
    rows = await db.fetch("""select pid from pg_locks where locktype = 'advisory' and not granted
                             and database = (select oid from pg_database where datname = current_database())""")
    return [row["pid"] for row in rows]


def query_blocking(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """One statement on a connection of its own, for tests that drive processes without an event loop:
    its rows (none for a statement that returns none)."""

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())
