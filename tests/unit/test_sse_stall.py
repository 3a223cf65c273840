"""Evicting clients that stopped reading, on real TCP sockets: when the timeout starts, and that a slow
reader is not taken for a frozen one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from backend.streaming import tcp
from backend.streaming.filters import EventFilter
from backend.streaming.subscriber import Subscriber
from tests.support import eventually

CHUNK = b"x" * 4096


@dataclass
class Pair:
    transport: asyncio.Transport
    peer: socket.socket


class _Sink(asyncio.Protocol):
    pass


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A server-side asyncio transport and a raw peer socket, both with small buffers so that a peer
    that stops reading makes the transport buffer within milliseconds."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer = socket.socket()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    peer.connect(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    accepted.setblocking(False)
    transport, _ = await loop.create_connection(_Sink, sock=accepted)
    try:
        yield Pair(transport, peer)
    finally:
        transport.abort()
        peer.close()


def subscriber(transport: asyncio.Transport, timeout_s: float) -> Subscriber:
    return Subscriber("key", transport, 0, EventFilter(), send_timeout_s=timeout_s)


async def fill(sub: Subscriber, transport: asyncio.Transport) -> float:
    """Push until the socket refuses bytes; return when data last got through (monotonic)."""
    for _ in range(1000):
        sub.push(CHUNK)
        if transport.get_write_buffer_size():
            return time.monotonic()
        await asyncio.sleep(0.001)
    raise AssertionError("the socket never refused bytes")


async def test_idle_time_comes_from_the_kernel(pair: Pair) -> None:
    pair.transport.write(b"hello")
    await asyncio.sleep(0.25)
    idle = tcp.idle_s(pair.transport)
    assert idle is not None and 0.2 <= idle < 2.0
    assert pair.peer.recv(16) == b"hello"


async def test_no_idle_time_once_the_connection_is_gone(pair: Pair) -> None:
    """A client that leaves while its stream catches up: its socket is closed when the stall check
    asks. asyncio's closed socket raises OSError; uvloop's raises ValueError ("negative file descriptor")."""
    family = pair.transport.get_extra_info("socket").family
    closed = socket.socket(family, socket.SOCK_STREAM)
    closed.close()

    class ClosedUnderUvloop:
        def __init__(self) -> None:
            self.family = family

        def getsockopt(self, *args: object) -> bytes:
            raise ValueError("negative file descriptor")

    for sock in (closed, ClosedUnderUvloop()):
        transport = SimpleNamespace(get_extra_info=lambda name, default=None, sock=sock: sock)
        assert tcp.idle_s(transport) is None


async def test_no_idle_time_off_tcp() -> None:
    left, right = socket.socketpair()
    try:
        transport, _ = await asyncio.get_running_loop().create_connection(_Sink, sock=left)
        assert tcp.idle_s(transport) is None
        transport.abort()
    finally:
        right.close()


async def test_a_frozen_peer_is_evicted_one_timeout_after_its_window_closed(pair: Pair) -> None:
    sub = subscriber(pair.transport, 1.0)
    await fill(sub, pair.transport)
    await asyncio.sleep(0.5)  # the socket refused bytes a while ago; the timer arms only now
    armed_at = time.monotonic()
    sub.push(CHUNK)
    idle = tcp.idle_s(pair.transport)
    assert idle is not None and idle >= 0.45
    # due when 1 s has passed since data last left (0.5 s or less after arming), not 1 s after arming;
    # read off the timer, as a loaded machine may run it late
    timer = sub._stall
    assert timer is not None
    assert timer.when() - asyncio.get_running_loop().time() < 1.0 - 0.45
    await eventually(pair.transport.is_closing, timeout=3.0 - (time.monotonic() - armed_at), interval=0.01,
                     what="the eviction")
    assert sub.closing


async def test_a_slow_reader_is_not_evicted(pair: Pair) -> None:
    sub = subscriber(pair.transport, 0.4)
    await fill(sub, pair.transport)
    deadline = time.monotonic() + 1.5  # several timeouts, with bytes waiting the whole time
    pair.peer.setblocking(False)
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            pair.peer.recv(2048)  # a trickle: much slower than the writer
        sub.push(CHUNK)
        assert pair.transport.get_write_buffer_size() > 0
        await asyncio.sleep(0.05)
    assert not pair.transport.is_closing()
    assert not sub.closing
