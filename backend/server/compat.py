"""The aiohttp internals backend.server relies on, checked rather than assumed.

`missing_internals()` lists what this aiohttp lacks; the server then falls back to aiohttp's own
behaviour (and says so in the log), and tests/unit/test_server_compat.py fails, so that an aiohttp
upgrade that moves one of these is noticed before it ships.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

# setup.cfg declares the same range.
SUPPORTED = ((3, 14), (4, 0))

# RequestHandler (and BaseProtocol) state read or set by backend.server.protocol.
HANDLER_ATTRIBUTES = (
    "_waiter", "_messages", "_request_count", "_request_in_progress", "_force_close", "_close",
    "_payload_parser", "_upgraded", "_loop", "transport", "max_line_size",
)
# Methods overridden or called, with the parameters the overrides take.
HANDLER_METHODS: dict[str, tuple[str, ...]] = {
    "__init__": ("manager", "loop", "access_log_class", "max_line_size", "max_field_size"),
    "connection_made": ("transport",),
    "connection_lost": ("exc",),
    "data_received": ("data",),
    "close": (),
    "force_close": (),
    "finish_response": ("request", "resp", "start_time"),
    "shutdown": ("timeout",),
    "handle_error": ("request", "status", "exc", "message"),
    "log_exception": (),
}
# The shutdown sequence the drain fits into: BaseRunner.cleanup stops the sites, calls
# Server.pre_shutdown (close() on every connection), the on_shutdown hooks, then Server.shutdown
# (shutdown(timeout) on every connection), in this order.
SOURCE_ORDER: tuple[tuple[Callable[..., object], tuple[str, ...]], ...] = (
    (web.BaseRunner.cleanup, ("site.stop()", "pre_shutdown()", "self.shutdown()", "_server.shutdown(")),
    (web.Server.pre_shutdown, ("conn.close()",)),
    (web.Server.shutdown, ("conn.shutdown(timeout)",)),
)


def version() -> tuple[int, ...]:
    return tuple(int(part) for part in aiohttp.__version__.split(".")[:2] if part.isdigit())


def missing_internals() -> list[str]:
    """What backend.server needs and this aiohttp lacks (empty when all is in place)."""
    return list(_missing())


def _missing() -> Iterator[str]:
    low, high = SUPPORTED
    if not low <= version() < high:
        yield f"aiohttp {aiohttp.__version__} is outside the supported range"
    slots = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    for name in HANDLER_ATTRIBUTES:
        if name not in slots:
            yield f"RequestHandler.{name}"
    for name, parameters in HANDLER_METHODS.items():
        method = getattr(RequestHandler, name, None)
        if method is None:
            yield f"RequestHandler.{name}()"
            continue
        accepted = inspect.signature(method).parameters
        for parameter in parameters:
            if parameter not in accepted:
                yield f"RequestHandler.{name}({parameter})"
    for function, steps in SOURCE_ORDER:
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            yield f"{function.__qualname__} (source unavailable)"
            continue
        positions = [source.find(step) for step in steps]
        if -1 in positions or positions != sorted(positions):
            yield f"{function.__qualname__} ({', '.join(steps)})"
