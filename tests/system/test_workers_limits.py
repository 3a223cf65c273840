"""`serve --workers 2` for real: which worker answers is visible (X-Tally-Worker), one wallet's commands
alternate between the two workers deterministically (each request on a connection known to reach the
wanted worker), and the per-key limits hold for the host, not per worker: the rate limit admits the
configured rate in total, and the stream cap counts the streams of both workers exactly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.system.serving import create_key, serving_workers
from tests.system.test_workers import alternate

pytestmark = pytest.mark.system

WORKER_HEADER = "X-Tally-Worker"


@contextlib.asynccontextmanager
async def pinned(base: str, worker: int, headers: dict[str, str]) -> AsyncIterator[aiohttp.ClientSession]:
    """A session whose one keep-alive connection reaches `worker`: the kernel picks the worker when a
    connection is made, so connect, ask, and start again until the wanted one answers."""
    for _ in range(200):
        session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=1))
        try:
            async with session.get(f"{base}/health/live") as reply:
                await reply.read()
                answered = int(reply.headers[WORKER_HEADER])
        except BaseException:
            await session.close()
            raise
        if answered == worker:
            try:
                yield session
            finally:
                await session.close()
            return
        await session.close()
    raise AssertionError(f"no connection reached worker {worker}")


class Workers:
    """Sessions pinned to each worker; `pick(n)` alternates between them (several per worker, so that
    concurrent requests race on both)."""

    def __init__(self, sessions: list[list[aiohttp.ClientSession]]) -> None:
        self.sessions = sessions

    def pick(self, n: int) -> aiohttp.ClientSession:
        group = self.sessions[n % 2]
        return group[(n // 2) % len(group)]


@contextlib.asynccontextmanager
async def both_workers(base: str, headers: dict[str, str], per_worker: int) -> AsyncIterator[Workers]:
    async with contextlib.AsyncExitStack() as stack:
        sessions = [[await stack.enter_async_context(pinned(base, worker, headers)) for _ in range(per_worker)]
                    for worker in (0, 1)]
        yield Workers(sessions)


def test_one_wallet_alternating_between_the_workers_of_serve(fresh_database_url: str) -> None:
    """The same checks as with two lone processes (test_workers.py), through one port: each command on
    the other worker than the one before, the debit race split over both, and a settle between wallets
    last written by different workers."""
    token = create_key(fresh_database_url)
    with serving_workers(fresh_database_url) as server:
        asyncio.run(alternate_on_workers(fresh_database_url, token, server.base))


async def alternate_on_workers(database_url: str, token: str, base: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with both_workers(base, headers, per_worker=10) as workers:
        answered: Counter[str] = Counter()

        def on(n: int) -> aiohttp.ClientSession:
            session = workers.pick(n)
            answered[str(n % 2)] += 1
            return session

        await alternate(database_url, token, base, base, on)
        assert answered["0"] > 50 and answered["1"] > 50, answered


@pytest.mark.timeout(180)
def test_the_rate_limit_holds_for_the_host(fresh_database_url: str) -> None:
    token = create_key(fresh_database_url)
    rate, burst = 20, 10
    with serving_workers(fresh_database_url, RATE_LIMIT_PER_S=str(rate), RATE_LIMIT_BURST=str(burst)) as server:
        admitted, seconds, by_worker = asyncio.run(hammer(server.base, token, 3.0))
    expected = burst + rate * seconds
    assert by_worker["0"] > 0 and by_worker["1"] > 0, by_worker  # both workers admitted some
    assert 0.9 * expected <= admitted <= 1.1 * expected, (admitted, expected, by_worker)


async def hammer(base: str, token: str, seconds: float) -> tuple[int, float, Counter[str]]:
    """Requests of one key from connections pinned to both workers, as fast as they go, for `seconds`:
    how many were admitted, over how long (first request sent to last answered), and by which worker."""
    headers = {"Authorization": f"Bearer {token}"}
    admitted: Counter[str] = Counter()
    refused = 0
    async with both_workers(base, headers, per_worker=4) as workers:
        started = time.monotonic()
        last = started

        async def client(session: aiohttp.ClientSession) -> None:
            nonlocal refused, last
            while time.monotonic() - started < seconds:
                async with session.get(f"{base}/v1/events?limit=1") as reply:
                    await reply.read()
                    last = time.monotonic()
                    if reply.status == 200:
                        admitted[reply.headers[WORKER_HEADER]] += 1
                    else:
                        assert reply.status == 429, reply.status
                        refused += 1

        await asyncio.gather(*(client(session) for group in workers.sessions for session in group))
    assert refused > sum(admitted.values()), (refused, admitted)  # the clients asked for far more
    return sum(admitted.values()), last - started, admitted


@pytest.mark.timeout(180)
def test_the_stream_cap_counts_the_streams_of_every_worker(fresh_database_url: str) -> None:
    token = create_key(fresh_database_url)
    with serving_workers(fresh_database_url, SSE_MAX_STREAMS_PER_KEY="3") as server:
        asyncio.run(fill_the_cap(server.base, token))


async def open_stream(session: aiohttp.ClientSession, base: str) -> aiohttp.ClientResponse:
    reply = await session.get(f"{base}/v1/streams/events?after=now")
    assert reply.status == 200 and reply.content_type == "text/event-stream", reply.status
    return reply


async def fill_the_cap(base: str, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with both_workers(base, headers, per_worker=3) as workers:
        zero, one = workers.sessions
        streams = [await open_stream(zero[0], base), await open_stream(one[0], base),
                   await open_stream(one[1], base)]
        assert all("X-Stream-Refused" not in reply.headers for reply in streams)
        # The cap is 3 for the key on the host: a fourth is refused on either worker.
        for session in (zero[1], one[2], zero[2]):
            refused = await open_stream(session, base)
            body = await refused.text()
            assert refused.headers["X-Stream-Refused"] == "rate_limited", body
            assert "event: refused" in body
        # Closing one (on worker 1) makes room, on worker 0 too, once worker 1 has seen the client leave.
        streams[2].close()
        await one[1].close()
        deadline = time.monotonic() + 10
        while True:
            again = await open_stream(zero[1], base)
            if "X-Stream-Refused" not in again.headers:
                break
            await again.read()
            assert time.monotonic() < deadline, "the closed stream still counts"
            await asyncio.sleep(0.1)
        refused = await open_stream(zero[2], base)
        assert refused.headers["X-Stream-Refused"] == "rate_limited"
        await refused.read()
        for reply in (*streams[:2], again):
            reply.close()
