"""The aiohttp internals backend.server leans on are all there. When an aiohttp upgrade moves one,
this fails (and `serve` falls back to aiohttp's own behaviour, saying so in its log)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import HttpRequestParser

from backend.config import Settings
from backend.server import compat
from backend.server.errors import TOO_MANY_HEADERS_MESSAGE, parser_problem
from backend.server.protocol import STOCK, ProtocolOptions, TallyRequestHandler, protocol_factory
from backend.server.run import MAX_FIELD_SIZE, MAX_LINE_SIZE, protocol_options


def test_every_internal_the_server_relies_on_is_in_this_aiohttp() -> None:
    assert compat.missing_internals() == [], (
        f"aiohttp {aiohttp.__version__} changed internals backend.server relies on; adapt backend/server "
        "(or narrow the supported range in setup.cfg and backend/server/compat.py)")


def test_the_supported_range_is_the_one_setup_cfg_declares() -> None:
    from tests.conftest import ROOT

    low, high = compat.SUPPORTED
    declared = (ROOT / "setup.cfg").read_text()
    assert f"aiohttp>={low[0]}.{low[1]}" in declared and f",<{high[0]}" in declared


def test_a_check_that_finds_something_missing_says_what(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "HANDLER_ATTRIBUTES", (*compat.HANDLER_ATTRIBUTES, "_no_such_slot"))
    assert compat.missing_internals() == ["RequestHandler._no_such_slot"]


def parse(raw: bytes) -> BaseException:
    loop = asyncio.new_event_loop()
    try:
        parser = HttpRequestParser(None, loop, 2**16, max_line_size=MAX_LINE_SIZE,
                                   max_field_size=MAX_FIELD_SIZE, max_headers=128)
        try:
            parser.feed_data(raw)
        except BadHttpMessage as exc:
            return exc
        raise AssertionError("the parser accepted it")
    finally:
        loop.close()


def test_the_parser_errors_still_tell_which_limit_was_exceeded() -> None:
    """The codes of backend.server.errors hang on these: a LineTooLong's limit, and the message for
    too many header fields."""
    too_long_line = parse(b"GET /" + b"a" * MAX_LINE_SIZE + b" HTTP/1.1\r\n\r\n")
    assert isinstance(too_long_line, LineTooLong)
    assert parser_problem(400, too_long_line, max_line_size=MAX_LINE_SIZE).code == "uri_too_long"
    too_long_field = parse(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_FIELD_SIZE + b"\r\n\r\n")
    assert parser_problem(400, too_long_field, max_line_size=MAX_LINE_SIZE).code == "header_too_large"
    too_many = parse(b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(200)) + b"\r\n")
    assert isinstance(too_many, BadHttpMessage) and too_many.message == TOO_MANY_HEADERS_MESSAGE


def test_without_an_internal_the_server_falls_back_to_stock_aiohttp(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings()
    assert protocol_options(settings) == ProtocolOptions(
        graceful_drain=True, drain_idle_close_s=settings.drain_idle_close_s,
        header_read_timeout_s=settings.header_read_timeout_s, parser_error_problems=True)
    monkeypatch.setattr(compat, "missing_internals", lambda: ["RequestHandler._waiter"])
    with caplog.at_level(logging.WARNING):
        assert protocol_options(settings) is STOCK
    assert "lacks internals" in caplog.text


async def test_stock_options_serve_with_aiohttp_s_own_request_handler() -> None:
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        assert runner.server is not None
        assert protocol_factory(runner.server, STOCK, {}) is runner.server
        made = protocol_factory(runner.server, ProtocolOptions(), {})()
        assert isinstance(made, TallyRequestHandler)
    finally:
        await runner.cleanup()
