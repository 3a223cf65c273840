"""A listening site that accepts every pending connection each time the socket is readable.

libuv, under uvloop, accepts one connection per event-loop iteration (libuv 1.45, pull request 3696).
Under load an iteration takes milliseconds, so a burst of new connections queues in the kernel and
their first requests make the tail latency (measured: docs/PERFORMANCE.md). Dashboards reconnecting
after a deploy and load balancers refilling their pools open connections in exactly such bursts.

So this site owns its listening sockets. When one is readable it accepts up to `backlog` connections
at once and hands each to the running loop's own transport machinery (``connect_accepted_socket``),
on uvloop and on asyncio alike. Like asyncio, it stops accepting for a second when the process is
out of file descriptors or memory, rather than spinning on the error.

On shutdown, `stop_accepting` takes every connection the kernel has already completed before it
closes the sockets: a client that connected before that gets answered; one that connects after is
refused (and can retry another process), never accepted and then reset. Only a connection the kernel
completes in the instant between the last accept and the close is reset by the kernel, unread: the
process never saw its request, as if refused (Linux's net.ipv4.tcp_migrate_req hands such connections
to another worker's socket while one is still open).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from aiohttp import web
from yarl import URL

log = logging.getLogger(__name__)

RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
PAUSE_ON_RESOURCE_ERROR_S = 1.0


class CannotListen(OSError):
    """The site could not bind its address (in use, not this host's, not permitted)."""


class Listening(asyncio.AbstractServer):
    """What aiohttp's runner asks of a server: its sockets (for runner.addresses) and close()."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket]) -> None:
        self._loop = loop
        self._sockets = sockets

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return any(sock.fileno() != -1 for sock in self._sockets)

    def close(self) -> None:
        for sock in self._sockets:
            if sock.fileno() != -1:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    async def start_serving(self) -> None:
        return None  # it serves from the moment the site starts

    async def serve_forever(self) -> None:
        raise NotImplementedError("the aiohttp runner drives this server")

    async def wait_closed(self) -> None:
        return None


ProtocolFactory = Callable[[], asyncio.Protocol]


class BatchAcceptSite(web.BaseSite):
    __slots__ = ("_connecting", "_host", "_port", "_protocol_factory", "_reuse_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, backlog: int = 128,
                 protocol_factory: ProtocolFactory | None = None, reuse_port: bool = False) -> None:
        """`protocol_factory` makes each connection's protocol (default: the runner's server, stock
        aiohttp's RequestHandler). `reuse_port`: bind with SO_REUSEPORT, so that the several worker
        processes of one `serve --workers N` listen on one port and the kernel spreads connections."""
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._connecting: set[asyncio.Task[Any]] = set()
        self._protocol_factory = protocol_factory
        self._reuse_port = reuse_port

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:  # socket.gaierror: HOST names no address of this machine
            raise CannotListen(f"cannot listen on {self._host} port {self._port}: {exc.strerror or exc}") from exc
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                try:
                    sock = socket.socket(family, kind, proto)
                except OSError:
                    continue  # as asyncio does: this host lacks the family (IPv6, say); the others serve
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self._reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:  # as asyncio does: no IPv4-mapped addresses on a v6 socket
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(address)
                except OSError as exc:
                    ip = address[0] if isinstance(address[0], str) else self._host
                    raise CannotListen(f"cannot listen on {ip} port {self._port}: {exc.strerror or exc}") from exc
                sock.listen(self._backlog)
                sock.setblocking(False)
            if not sockets:
                raise CannotListen(f"cannot listen on {self._host} port {self._port}: no usable address")
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._server = Listening(loop, sockets)
        for sock in sockets:
            loop.add_reader(sock.fileno(), self.accept_pending, sock)

    async def stop_accepting(self) -> None:
        """Take every connection already queued in the kernel, close the listening sockets (new
        connections are refused from here on), and wait until the taken ones are being served."""
        if isinstance(self._server, Listening):
            for sock in self._server.sockets:
                if sock.fileno() != -1:
                    asyncio.get_running_loop().remove_reader(sock.fileno())
                    self.accept_pending(sock, limit=None)
        if self._server is not None:
            self._server.close()
        if self._connecting:
            await asyncio.wait(set(self._connecting))

    def accept_pending(self, listening: socket.socket, *, limit: int | None = -1) -> int:
        """Accept every connection waiting on this socket (up to the backlog, or up to `limit`, None
        for no limit); how many were taken."""
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        factory: ProtocolFactory = self._protocol_factory or server
        most = self._backlog if limit == -1 else limit
        accepted = 0
        while most is None or accepted < most:
            try:
                conn, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return accepted
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRORS:
                    raise
                log.error("cannot accept connections, pausing for a second", extra={"reason": str(exc)})
                loop.remove_reader(listening.fileno())
                loop.call_later(PAUSE_ON_RESOURCE_ERROR_S, self._resume, listening)
                return accepted
            conn.setblocking(False)
            task = loop.create_task(_hand_over(loop, factory, conn))
            self._connecting.add(task)
            task.add_done_callback(self._connected)
            accepted += 1
        return accepted

    def _resume(self, listening: socket.socket) -> None:
        if self._server is not None and listening.fileno() != -1:
            asyncio.get_running_loop().add_reader(listening.fileno(), self.accept_pending, listening)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("an accepted connection could not be set up", extra={"reason": str(exc)})


async def _hand_over(loop: asyncio.AbstractEventLoop, factory: ProtocolFactory, conn: socket.socket) -> None:
    """Make the accepted socket a transport of the loop, served by aiohttp's protocol."""
    try:
        await loop.connect_accepted_socket(factory, conn)
    except BaseException:
        conn.close()
        raise
