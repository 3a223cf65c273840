"""The connection protocol: aiohttp's RequestHandler, plus three things it lacks.

- A drain that drops nothing. aiohttp's shutdown marks every connection closing at once: a request
  that arrives on a kept-alive connection afterwards is read and thrown away, and a response under
  way still says keep-alive just before the connection closes, so clients see resets. Here, once the
  drain begins, every response carries ``Connection: close``, a request arriving meanwhile is read and
  answered (with ``Connection: close``), and a connection left idle for DRAIN_IDLE_CLOSE_S is closed.
- A header-read timeout: a connection must complete its request head within HEADER_READ_TIMEOUT_S
  of connecting, or of the first byte of a later request, or it gets a 408 and is closed (a slowloris
  client otherwise holds a connection for the whole keep-alive timeout).
- problem+json for requests the HTTP parser rejects, with a stable code and never the offending
  bytes, in the answer or in the log.

Each leans on RequestHandler internals (backend.server.compat lists them); each is behind a setting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_exceptions import HTTPException
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from backend.http.problems import problem_response
from backend.server.errors import head_timeout_response, parser_problem, unmet_expectation

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ProtocolOptions:
    graceful_drain: bool = True
    drain_idle_close_s: float = 1.0
    header_read_timeout_s: float = 5.0
    parser_error_problems: bool = True

    @property
    def stock(self) -> bool:
        """True when every addition is off: serve with aiohttp's own RequestHandler."""
        return not (self.graceful_drain or self.header_read_timeout_s > 0 or self.parser_error_problems)


STOCK = ProtocolOptions(graceful_drain=False, header_read_timeout_s=0, parser_error_problems=False)


LINGER_S = 2.0
"""How long a connection cut off for a slow head stays half-closed before it is closed."""


class TallyRequestHandler(RequestHandler):
    __slots__ = ("_closed", "_drain_deadline", "_draining", "_head_bytes", "_head_since", "_head_timer",
                 "_idle_timer", "_last_payload", "_lingering", "_options")

    def __init__(self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, options: ProtocolOptions,
                 **kwargs: Any) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._options = options
        self._draining = False
        self._drain_deadline = 0.0
        self._closed: asyncio.Future[None] = loop.create_future()
        # When the head being waited for became due (connecting, or its first byte), None when no head
        # is due; whether any byte of it came. One timer per connection checks it (not one per request:
        # it re-arms itself for what is left, as aiohttp's keep-alive timer does).
        self._head_since: float | None = None
        self._head_bytes = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._last_payload: Any = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._lingering = False

    # ------------------------------------------------------------------ connection and head reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._options.header_read_timeout_s > 0:  # the first head is due within the timeout of connecting
            self._head_since = self._loop.time()
            self._arm_head_timer(self._options.header_read_timeout_s)

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._head_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = None
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered and half-closed: what the client still sends is discarded
        # Whether these bytes begin a request head (rather than continue the last request's body) is
        # judged before the parser sees them; the bookkeeping after, only for a head left incomplete:
        # a whole request in one read, the common case, costs three checks.
        starts_head = False
        if data and not self._head_bytes and self._payload_parser is None and not self._upgraded:
            last = self._last_payload
            starts_head = last is None or bool(last.is_eof())
        count = self._request_count
        RequestHandler.data_received(self, data)
        if self._request_count != count:  # the parser completed one head or more
            messages = self._messages
            self._last_payload = messages[-1][1] if messages else None
            self._head_bytes = False
            self._head_since = None
        elif starts_head:
            self._head_bytes = True  # a head begun, not yet complete
            timeout = self._options.header_read_timeout_s
            if self._head_since is None and timeout > 0:
                self._head_since = self._loop.time()
                if self._head_timer is None:
                    self._arm_head_timer(timeout)

    def _arm_head_timer(self, delay: float) -> None:
        if self.transport is not None:
            self._head_timer = self._loop.call_later(delay, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        since = self._head_since
        if self.transport is None or self._force_close or since is None:
            return
        timeout = self._options.header_read_timeout_s
        if self._request_in_progress or self._messages:
            self._arm_head_timer(timeout)  # a head pipelined behind a request being served: judge it later
            return
        left = since + timeout - self._loop.time()
        if left > 0:
            self._arm_head_timer(left)  # this head became due after the timer was set
            return
        log.info("closed a connection whose request head did not arrive in time",
                 extra={"remote": _peer(self.transport), "timeout_s": timeout})
        self.transport.write(head_timeout_response(timeout))
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Half-close after the answer, discard what the client still sends, and close a moment later
        (a lingering close, as nginx and Apache do): closing at once while a slow client keeps sending
        makes the kernel answer its next bytes with a reset, which can destroy the 408 before the
        client has read it."""
        transport = self.transport
        if transport is None:
            return
        self._lingering = True
        if isinstance(transport, asyncio.WriteTransport) and transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER_S, self.force_close)

    # ------------------------------------------------------------------ drain

    def begin_drain(self, deadline: float) -> None:
        """From now on answer with Connection: close; close the connection once idle."""
        self._draining = True
        self._drain_deadline = deadline
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self._loop.call_later(self._options.drain_idle_close_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._idle_timer = None
        if self.transport is None or self._force_close:
            return
        if self._idle():
            self.force_close()
        else:  # a request is being read or served (its answer carries Connection: close unless it was
            self._close_when_idle()  # under way before the drain): look again later

    def _idle(self) -> bool:
        """Waiting for a request of which no byte has arrived."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages and not self._head_bytes

    def close(self) -> None:
        """aiohttp's shutdown calls this on every connection: stock, it drops whatever arrives next
        and ends a waiting connection at once. While draining, a connection waiting for its next
        request is left to the drain (answered, or closed once idle)."""
        if self._draining and self._waiter is not None and not self._waiter.done():
            return
        super().close()

    def finish_response(self, request: BaseRequest, resp: StreamResponse,
                        start_time: float | None) -> Coroutine[Any, Any, tuple[StreamResponse, bool]]:
        """aiohttp's own (no coroutine of ours around it) until the drain begins. An HTTP error raised
        before the app's middlewares ran (aiohttp's answer to an Expect it does not meet, on any path)
        arrives here as text quoting the request: it goes out as problem+json instead."""
        if isinstance(resp, HTTPException) and self._options.parser_error_problems:
            resp = problem_response(unmet_expectation(resp))
        if self._draining:
            return self._finish_draining(request, resp, start_time)
        return RequestHandler.finish_response(self, request, resp, start_time)

    async def _finish_draining(self, request: BaseRequest, resp: StreamResponse,
                               start_time: float | None) -> tuple[StreamResponse, bool]:
        if not resp.prepared:
            resp.force_close()
        result = await RequestHandler.finish_response(self, request, resp, start_time)
        if not self._force_close:
            self._close_when_idle()  # it went out keep-alive (prepared before the drain)
        return result

    async def shutdown(self, timeout: float | None = 15.0) -> None:
        """Wait (until the drain's deadline) for the connection to end by itself, then let aiohttp
        cancel and close whatever is left."""
        if self._draining:
            remaining = self._drain_deadline - self._loop.time()
            if remaining > 0 and not self._closed.done():
                await asyncio.wait({self._closed}, timeout=remaining)
            timeout = max(self._drain_deadline - self._loop.time(), 0.01)
        await super().shutdown(timeout)

    # ------------------------------------------------------------------ parser errors

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        if not self._options.parser_error_problems:
            return super().handle_error(request, status, exc, message)
        problem = parser_problem(status, exc, max_line_size=self.max_line_size)
        if problem.status >= 500:
            self.log_exception("error handling a request", exc_info=exc)
        else:  # the exception's message quotes the request's bytes: log only its kind
            log.info("rejected a malformed request", extra={
                "status": problem.status, "code": problem.code, "error": type(exc).__name__,
                "remote": request.remote})
        if request.writer.output_size > 0:
            raise ConnectionError("the response is under way, no error answer can follow")
        response = problem_response(problem)
        response.force_close()
        return response


def _peer(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


def protocol_factory(server: web.Server, options: ProtocolOptions, handler_kwargs: dict[str, Any]) -> Any:
    """What the site makes each connection's protocol with: aiohttp's own when every addition is off."""
    if options.stock:
        return server
    loop = asyncio.get_running_loop()

    def make() -> TallyRequestHandler:
        return TallyRequestHandler(server, loop=loop, options=options, **handler_kwargs)

    return make
