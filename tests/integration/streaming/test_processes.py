"""Frozen clients, several processes, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid

import aiohttp_sse
import pytest

from backend.store.event_store import EventStore
from tests.conftest import mint_token
from tests.integration.streaming.conftest import MakeClient, append, connect, hub_of
from tests.integration.streaming.test_wallets_dashboard import open_wallet, post
from tests.support import eventually

pytestmark = pytest.mark.timeout(120)


async def frozen_client(host: str, port: int, token: str, path: str) -> socket.socket:
    """A raw client with a tiny receive buffer that reads the response head, then never reads again."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
    await loop.sock_sendall(sock, request.encode())
    head_ = b""
    async with asyncio.timeout(10):
        while b"\r\n\r\n" not in head_:
            head_ += await loop.sock_recv(sock, 1)
    assert head_.startswith(b"HTTP/1.1 200"), head_
    return sock


@pytest.mark.parametrize("kernel_timeout", [True, False], ids=["tcp-user-timeout", "hub-watchdog"])
async def test_frozen_client_is_evicted_while_another_keeps_receiving(
    make_client: MakeClient, store: EventStore, monkeypatch: pytest.MonkeyPatch, kernel_timeout: bool
) -> None:
    # aiohttp-sse also asks Linux to abort a connection whose data stays unacknowledged for the send
    # timeout (TCP_USER_TIMEOUT); without it, the hub's own watchdog must evict the stuck send.
    if not kernel_timeout:
        monkeypatch.setattr(aiohttp_sse, "_TCP_USER_TIMEOUT", None)
    client = await make_client(sse_send_timeout_s=0.5)
    token = await mint_token(client.app, "auditor", ["audit:read"])
    hub = hub_of(client)
    prefix = f"frozen{uuid.uuid4().hex[:8]}-"
    start = await store.head()
    path = f"/v1/streams/events?stream_prefix={prefix}&after={start}"
    frozen = await frozen_client(str(client.server.host), int(client.server.port or 0), token, path)
    healthy = await connect(client, "/v1/streams/events", token, stream_prefix=prefix, after=start)
    assert healthy.status == 200
    await eventually(lambda: hub.streams == 2)

    written: list[int] = []
    stop = asyncio.Event()

    async def write() -> None:  # big events fill the frozen client's socket buffers quickly
        while not stop.is_set():
            written.extend(await append(store, f"{prefix}{uuid.uuid4()}", *["Big"] * 4, blob="x" * 16_000))

    received: list[int] = []

    async def read() -> None:
        while True:
            message = await healthy.next(timeout=30)
            if message.kind == "event":
                received.append(int(message.last_id))

    writer, reader = asyncio.create_task(write()), asyncio.create_task(read())
    try:
        await eventually(lambda: hub.streams == 1, timeout=60)  # the frozen one is gone
    finally:
        stop.set()
        await writer
    if not kernel_timeout:  # closed by the hub's watchdog: counted, and shown in /metrics
        assert hub.evictions == 1
        scrape = await (await client.get("/metrics")).text()
        assert "tally_stream_evictions_total 1.0" in scrape.splitlines()
    await eventually(lambda: len(received) >= len(written) or reader.done(), timeout=30)
    reader.cancel()
    assert received == written  # the healthy client missed nothing meanwhile
    frozen.setblocking(True)
    frozen.settimeout(10)
    with contextlib.suppress(ConnectionResetError):  # closed by the server: what was in flight, then the end
        while frozen.recv(65536):
            pass
    frozen.close()
    healthy.close()


async def test_an_event_committed_through_one_process_reaches_a_stream_on_another(
    make_client: MakeClient,
) -> None:
    first, second = await make_client(), await make_client()
    admin = await mint_token(first.app, "operator", ["admin"])
    reader = await mint_token(first.app, "hana", ["wallets:read"])
    wallet = await open_wallet(first, admin, "hana")
    sse = await connect(second, f"/v1/streams/wallets/{wallet}", reader, after="now")
    await sse.next()
    credited = await post(first, admin, f"/v1/wallets/{wallet}/credits", {"amount": 42, "reference": "x"})
    (message,) = await sse.events(1)
    assert int(message.last_id) == credited["position"]
    assert message.json()["wallet"]["balance"] == 42
    sse.close()


async def test_shutdown_ends_every_stream_cleanly(make_client: MakeClient) -> None:
    client = await make_client(sse_shutdown_window_s=0.3)
    token = await mint_token(client.app, "auditor", ["audit:read"])
    streams = [await connect(client, "/v1/streams/events", token, after="now") for _ in range(5)]
    streams.append(await connect(client, "/v1/streams/dashboard", token))
    for sse in streams:
        await sse.next()
    hub = hub_of(client)
    await asyncio.gather(client.server.close(), *(sse.drain_to_end() for sse in streams))
    assert all(sse.ended for sse in streams)  # a clean end of the response, not a broken connection
    assert hub.streams == 0
