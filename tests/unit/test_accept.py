"""BatchAcceptSite: one wake-up of the listening socket accepts every waiting connection, on uvloop
and on asyncio; when the process runs out of descriptors it pauses, then accepts again."""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp import web

from backend import event_loop
from backend.server import site as accept
from backend.server.site import BatchAcceptSite
from tests.support import eventually

LOOPS = ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None, reason="uvloop is not installed"))]
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"


async def hello(_request: web.Request) -> web.Response:
    return web.Response(text="hello")


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[web.AppRunner, BatchAcceptSite, socket.socket]]:
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = BatchAcceptSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        listening = next(iter(site._server.sockets))  # type: ignore[union-attr]
        yield runner, site, listening
    finally:
        await runner.cleanup()


async def ask(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, REQUEST)
    return await loop.sock_recv(sock, 4096)


def on(loop: str, test: Callable[[], Awaitable[None]]) -> None:
    event_loop.run(test(), loop)  # type: ignore[arg-type]


@pytest.mark.parametrize("loop", LOOPS)
def test_one_wake_up_accepts_the_whole_burst(loop: str) -> None:
    async def test() -> None:
        async with serving() as (runner, site, listening):
            asyncio.get_running_loop().remove_reader(listening.fileno())  # only the call below accepts
            clients = [socket.create_connection(listening.getsockname()) for _ in range(40)]
            try:
                assert site.accept_pending(listening) == 40
                server = runner.server
                assert server is not None
                await eventually(lambda: len(server.connections) == 40)
                for client in clients:
                    client.setblocking(False)
                replies = await asyncio.gather(*(ask(client) for client in clients))
                assert all(reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello") for reply in replies)
                assert site.accept_pending(listening) == 0  # nothing left waiting
            finally:
                for client in clients:
                    client.close()

    on(loop, test)


class RunsOutOfDescriptors:
    """A listening socket whose first accept fails with EMFILE, as when the process is at its limit."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real
        self.failures = 1

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.real.accept()


@pytest.mark.parametrize("loop", LOOPS)
def test_out_of_descriptors_pauses_accepting_then_resumes(loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accept, "PAUSE_ON_RESOURCE_ERROR_S", 0.05)

    async def test() -> None:
        async with serving() as (runner, site, listening):
            running = asyncio.get_running_loop()
            running.remove_reader(listening.fileno())
            failing = RunsOutOfDescriptors(listening)
            assert site.accept_pending(failing) == 0  # type: ignore[arg-type]
            assert not running.remove_reader(listening.fileno())  # paused: no reader left
            client = socket.create_connection(listening.getsockname())
            try:
                server = runner.server
                assert server is not None
                await eventually(lambda: len(server.connections) == 1)  # resumed by itself, then accepted
                client.setblocking(False)
                assert (await ask(client)).startswith(b"HTTP/1.1 200")
            finally:
                client.close()

    on(loop, test)
