"""A database outage leaves warnings in the log, not tracebacks: asyncpg's pool, restoring its floor of
connections while the server is down, logs each failed attempt with one."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from backend.logs import configure_logging

POOL_LOG = logging.getLogger("asyncpg.pool")


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    """What the log handler of configure_logging writes (JSON lines)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("INFO", "json")
    written = io.StringIO()
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(written)
    try:
        yield written
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def logged(output: io.StringIO) -> dict[str, object]:
    lines = output.getvalue().splitlines()
    assert len(lines) == 1, lines
    return dict(json.loads(lines[0]))


def raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_the_pool_failing_to_reconnect_to_a_database_that_is_down_logs_no_traceback(output: io.StringIO) -> None:
    POOL_LOG.warning("Failed to restore the pool connection floor; retrying",
                     exc_info=raised(ConnectionRefusedError(111, "Connection refused")))
    entry = logged(output)
    assert "exc" not in entry, entry["exc"]
    assert entry["level"] == "WARNING"
    assert entry["reason"] == "ConnectionRefusedError: [Errno 111] Connection refused"


def test_an_error_that_is_no_outage_keeps_its_traceback(output: io.StringIO) -> None:
    POOL_LOG.warning("Failed to restore the pool connection floor; retrying", exc_info=raised(ValueError("a bug")))
    assert "Traceback" in str(logged(output)["exc"])
