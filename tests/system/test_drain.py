"""SIGTERM under load drops nothing: every request sent to a real server process gets a complete
answer, or its connection is refused (a client can retry that on another process); never a reset
or a disconnect mid-request. Answers given on kept-alive connections during the drain carry
`Connection: close`; the process exits 0."""

from __future__ import annotations

import asyncio
import errno
import json
import signal
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import asyncpg
import pytest

from backend.store.append import APPEND_LOCK_KEY
from tests.support import advisory_lock_waiters, eventually
from tests.system.serving import Server, create_key, serving

pytestmark = pytest.mark.system

IN_FLIGHT = 30  # credits held behind the append lock when SIGTERM arrives
KEPT_ALIVE = 8  # connections sending one request after another throughout
FRESH = 4  # clients opening a new connection for each request throughout
IDLE = 6  # kept-alive connections idle at SIGTERM that send a request once the drain has begun
SILENT = 4  # kept-alive connections idle at SIGTERM that never send again
DRAIN_IDLE_CLOSE_S = 3.0


@dataclass
class Outcomes:
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def dropped(self, what: str, exc: BaseException) -> None:
        self.counts["dropped"] += 1
        self.failures.append(f"{what}: {exc!r}")


def refused(exc: BaseException) -> bool:
    """The connection was never made, so no request was sent: the client may send it elsewhere. The
    kernel answers a SYN with a reset once the listening socket is closed (ECONNREFUSED), and also a
    handshake still in progress at the moment it closes (connect() then fails with ECONNRESET); after
    connect() succeeded, a reset is a dropped request, never this."""
    return isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error.errno in (errno.ECONNREFUSED,
                                                                                     errno.ECONNRESET)


async def credit(session: aiohttp.ClientSession, url: str, n: int, outcomes: Outcomes) -> None:
    try:
        async with session.post(url, json={"amount": 1, "reference": f"drain-{n}"}) as reply:
            await reply.read()
            outcomes.counts[f"in flight: answered {reply.status}"] += 1
    except aiohttp.ClientError as exc:
        if refused(exc):
            outcomes.counts["in flight: refused"] += 1
        else:
            outcomes.dropped("in-flight credit", exc)


async def retry_elsewhere(session: aiohttp.ClientSession, url: str, outcomes: Outcomes) -> None:
    """What a client (or a load balancer) does with a refused connection: send to another process."""
    try:
        async with session.get(url) as reply:
            await reply.read()
            outcomes.counts[f"refused, retried on the other process: answered {reply.status}"] += 1
    except aiohttp.ClientError as exc:
        outcomes.dropped("retry on the other process", exc)


async def keep_sending(url: str, other_url: str, headers: dict[str, str], outcomes: Outcomes,
                       first_done: asyncio.Event, stop: asyncio.Event) -> list[str]:
    """One connection, one request after another, until an answer says Connection: close; then one
    more request, which must find the port closed (and is sent to the other process). The Connection
    header of each answer, in order."""
    seen: list[str] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=headers) as session:
        while True:
            try:
                async with session.get(url) as reply:
                    await reply.read()
                    seen.append(reply.headers.get("Connection", "keep-alive").lower())
                    outcomes.counts["kept alive: answered"] += 1
            except aiohttp.ClientError as exc:
                if refused(exc):
                    outcomes.counts["kept alive: refused"] += 1
                    await retry_elsewhere(session, other_url, outcomes)
                else:
                    outcomes.dropped("kept-alive request", exc)
                return seen
            first_done.set()
            if seen[-1] == "close":
                outcomes.counts["kept alive: answered Connection: close"] += 1
            if stop.is_set():
                return seen


async def fresh_connections(base: str, other_base: str, outcomes: Outcomes, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        while not stop.is_set():
            try:
                async with session.get(f"{base}/health/live") as reply:
                    await reply.read()
                    outcomes.counts["fresh: answered"] += 1
            except aiohttp.ClientError as exc:
                if refused(exc):
                    outcomes.counts["fresh: refused"] += 1
                    await retry_elsewhere(session, f"{other_base}/health/live", outcomes)
                    return
                outcomes.dropped("request on a fresh connection", exc)
                return


class RawConnection:
    """A kept-alive HTTP/1.1 connection driven by hand, to send at a chosen moment."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, token: str) -> None:
        self.reader, self.writer = reader, writer
        self.request = (f"GET {path} HTTP/1.1\r\nHost: tally\r\nAuthorization: Bearer {token}\r\n\r\n").encode()

    @classmethod
    async def open(cls, server: Server, path: str, token: str) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer, path, token)

    async def exchange(self) -> dict[str, str] | None:
        """Send the request and read a complete answer: its headers, or None if the connection
        ended first."""
        self.writer.write(self.request)
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        try:
            await self.reader.readexactly(int(headers["content-length"]))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return headers

    async def closed_by_server(self) -> bool:
        try:
            return await self.reader.read(1) == b""
        except ConnectionError:
            return False  # reset rather than closed

    def close(self) -> None:
        self.writer.close()


async def draining(server: Server) -> None:
    """Until the server logs that its drain has begun (its connections now answer Connection: close)."""
    await eventually(lambda: "shutting down: draining requests" in server.logs(), timeout=30,
                     what=lambda: "the drain to begin: " + server.logs())


async def follow_stream(url: str, headers: dict[str, str], outcomes: Outcomes, opened: asyncio.Event) -> None:
    """An SSE stream open across the drain: it must end as a complete response."""
    async with aiohttp.ClientSession(headers=headers) as session:
        try:
            async with session.get(url) as reply:
                assert reply.status == 200, await reply.text()
                opened.set()
                async for _ in reply.content.iter_any():
                    pass
                outcomes.counts["stream: ended cleanly"] += 1
        except aiohttp.ClientError as exc:
            outcomes.dropped("event stream", exc)


def post(url: str, body: dict[str, object], headers: dict[str, str]) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={**headers, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        answer: dict[str, object] = json.loads(reply.read())
        return answer


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_sigterm_under_load_answers_or_refuses_every_request(database_url: str, event_loop: str) -> None:
    """On uvloop (auto, with the test extra) and on asyncio's loop: the site accepts differently."""
    token = create_key(database_url)
    headers = {"Authorization": f"Bearer {token}"}
    with serving(database_url, LOG_FORMAT="json", DRAIN_IDLE_CLOSE_S=str(DRAIN_IDLE_CLOSE_S),
                 EVENT_LOOP=event_loop) as server, serving(database_url) as other:
        wallet = post(f"{server.base}/v1/wallets", {"owner": "drain", "currency": "USD"}, headers)
        wallet_url = f"{server.base}/v1/wallets/{wallet['wallet_id']}"

        wallet_path = f"/v1/wallets/{wallet['wallet_id']}"

        async def scenario() -> tuple[Outcomes, list[list[str]], int]:
            outcomes = Outcomes()
            stop = asyncio.Event()
            blocker = await asyncpg.connect(database_url)
            try:
                await blocker.execute("select pg_advisory_lock($1)", APPEND_LOCK_KEY)
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers) as session:
                    credits = [asyncio.create_task(credit(session, f"{wallet_url}/credits", n, outcomes))
                               for n in range(IN_FLIGHT)]
                    started = [asyncio.Event() for _ in range(KEPT_ALIVE)]
                    senders = [asyncio.create_task(keep_sending(wallet_url, other.base + wallet_path, headers, outcomes,
                                                                first, stop))
                               for first in started]
                    fresh = [asyncio.create_task(fresh_connections(server.base, other.base, outcomes, stop))
                             for _ in range(FRESH)]
                    stream_opened = asyncio.Event()
                    stream = asyncio.create_task(
                        follow_stream(f"{server.base}/v1/streams/events?after=now", headers, outcomes, stream_opened))
                    opening = asyncio.create_task(stream_opened.wait())
                    await asyncio.wait({opening, stream}, return_when=asyncio.FIRST_COMPLETED)
                    if not opening.done():  # the stream failed before it opened: say why, not a timeout later
                        opening.cancel()
                        stream.result()
                    idle = [await RawConnection.open(server, wallet_path, token) for _ in range(IDLE + SILENT)]
                    for connection in idle:
                        assert await connection.exchange() is not None
                    await eventually(lambda: advisory_lock_waiters(blocker), timeout=10,
                                     what="the server's append to wait for the lock")
                    for first in started:
                        await first.wait()
                    await asyncio.sleep(0.5)  # the credits reach the server and wait behind the lock
                    server.proc.send_signal(signal.SIGTERM)
                    await draining(server)
                    for connection in idle[:IDLE]:  # a request arriving on an idle kept-alive connection
                        answer = await connection.exchange()
                        if answer is None:
                            outcomes.dropped("request on an idle kept-alive connection", ConnectionError())
                        else:
                            outcomes.counts[f"idle then sent: answered Connection: {answer.get('connection')}"] += 1
                    for connection in idle:  # then every one of them is closed, by the server
                        if await connection.closed_by_server():
                            outcomes.counts["idle: closed by the server"] += 1
                        connection.close()
                    await blocker.execute("select pg_advisory_unlock($1)", APPEND_LOCK_KEY)
                    await asyncio.gather(*credits)
                    exit_code = await asyncio.to_thread(server.proc.wait, 30)
                    stop.set()
                    seen = await asyncio.gather(*senders)
                    await asyncio.gather(*fresh, stream)
                return outcomes, seen, exit_code
            finally:
                await blocker.close()

        outcomes, seen, exit_code = asyncio.run(asyncio.wait_for(scenario(), 90))
        logs = server.logs()
    print(dict(outcomes.counts))
    assert outcomes.failures == [], (outcomes.failures, dict(outcomes.counts))
    assert exit_code == 0, logs
    assert outcomes.counts["in flight: answered 201"] + outcomes.counts["in flight: answered 200"] == IN_FLIGHT, \
        dict(outcomes.counts)
    for answers in seen:
        assert answers[0] == "keep-alive"  # answered before SIGTERM
        assert answers[-1] == "close", answers  # the drain's answer said so
        assert answers.count("close") == 1
    assert outcomes.counts["kept alive: refused"] == KEPT_ALIVE  # then the port was closed
    assert outcomes.counts["idle then sent: answered Connection: close"] == IDLE
    assert outcomes.counts["idle: closed by the server"] == IDLE + SILENT
    assert outcomes.counts["stream: ended cleanly"] == 1
    assert outcomes.counts["refused, retried on the other process: answered 200"] == KEPT_ALIVE + FRESH
    assert "draining" in logs and "stopped" in logs
