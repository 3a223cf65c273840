"""Run the app until SIGTERM or SIGINT, then drain: the `serve` command's server loop.

The drain, in order: take the connections the kernel already completed and stop listening (later
ones are refused, so a client can retry another process); tell every connection to answer with
``Connection: close`` and to close once idle; then aiohttp's own shutdown (on_shutdown hooks end the
streams, connections get until SHUTDOWN_TIMEOUT_S from the signal to finish, then cleanup contexts).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from backend import service_manager
from backend.config import Settings
from backend.http.access_log import AccessLogger
from backend.server import compat
from backend.server.protocol import STOCK, ProtocolOptions, TallyRequestHandler, protocol_factory
from backend.server.site import BatchAcceptSite

log = logging.getLogger("backend")

# The request line (with the URL) may be a little longer than a header field, so that a LineTooLong
# tells which one was exceeded (414 or 431).
MAX_LINE_SIZE = 8192
MAX_FIELD_SIZE = 8190


def protocol_options(settings: Settings) -> ProtocolOptions:
    """The protocol additions the settings ask for, or none when this aiohttp lacks what they need."""
    wanted = ProtocolOptions(
        graceful_drain=settings.graceful_drain,
        drain_idle_close_s=settings.drain_idle_close_s,
        header_read_timeout_s=settings.header_read_timeout_s,
        parser_error_problems=settings.parser_error_problems,
    )
    if wanted.stock:
        return STOCK
    missing = compat.missing_internals()
    if missing:
        log.warning("this aiohttp lacks internals the server relies on: serving with aiohttp's own "
                    "shutdown, timeouts and error pages", extra={"missing": missing})
        return STOCK
    return wanted


@dataclass(frozen=True, slots=True)
class Serving:
    runner: web.AppRunner
    site: BatchAcceptSite
    options: ProtocolOptions

    @property
    def port(self) -> int:
        return int(self.runner.addresses[0][1])

    async def stop(self, timeout_s: float, *, announce: bool = True) -> None:
        """Drain; `announce` logs that the process is draining (once per process: a second site of the
        same process, such as its metrics port, stops without saying it again)."""
        await drain(self.runner, self.site, timeout_s, self.options, announce=announce)


async def start(app: web.Application, settings: Settings, *, reuse_port: bool = False) -> Serving:
    """Run `app`'s startup and listen on settings.host:port with the Tally protocol (with SO_REUSEPORT
    when `reuse_port`: one of several workers on one port)."""
    options = protocol_options(settings)
    handler_kwargs: dict[str, Any] = {
        "access_log_class": AccessLogger, "max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE,
    }
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.shutdown_timeout_s,
                           **handler_kwargs)
    try:
        await runner.setup()
        assert runner.server is not None
        factory = protocol_factory(runner.server, options, handler_kwargs)
        site = BatchAcceptSite(runner, settings.host, settings.port, protocol_factory=factory,
                               reuse_port=reuse_port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return Serving(runner, site, options)


async def serve_app(app: web.Application, settings: Settings,
                    ready: Callable[[web.AppRunner], None] | None = None, *, reuse_port: bool = False) -> None:
    """Serve `app` until SIGTERM/SIGINT, then drain; `ready(runner)` once listening. A service manager
    hears READY=1 once the app's startup is done and the port listens (so /health/ready can answer),
    and STOPPING=1 when the drain begins; its watchdog is pinged throughout."""
    async with service_manager.watchdog():
        service_manager.status("starting: connecting to the database")
        serving = await start(app, settings, reuse_port=reuse_port)
        if ready is not None:
            ready(serving.runner)
        service_manager.ready(f"serving on port {serving.port}")
        await until_stopped()
        service_manager.stopping(f"draining: up to {settings.shutdown_timeout_s:g} s")
        await serving.stop(settings.shutdown_timeout_s)


async def until_stopped() -> None:
    """Return on SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def drain(runner: web.AppRunner, site: BatchAcceptSite, timeout_s: float, options: ProtocolOptions, *,
                announce: bool = True) -> None:
    server = runner.server
    if options.graceful_drain and server is not None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        await site.stop_accepting()
        connections = server.connections
        for connection in connections:
            if isinstance(connection, TallyRequestHandler):
                connection.begin_drain(deadline)
        if announce:
            log.info("shutting down: draining requests", extra={"connections": len(connections)})
    elif announce:
        log.info("shutting down: draining requests")
    await runner.cleanup()
