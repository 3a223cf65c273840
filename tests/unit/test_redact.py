"""No secret in a log line: what backend.logs.redact removes, and that the filter covers a record's
arguments, its `extra` fields and its traceback."""

from __future__ import annotations

import io
import json
import logging

import pytest

from backend.logs import JsonFormatter, RedactSecrets, RequestIdFilter, TextFormatter, redact

KEY_ID = "0123456789abcdef0123456789abcdef"
SECRET = "Zm9vYmFyLWJhei1xdXV4LXNlY3JldC1rZXktbWF0ZXJp"
TOKEN = f"tly_{KEY_ID}_{SECRET}"


@pytest.mark.parametrize("line", [
    f"Authorization: Bearer {TOKEN}",
    f"Invalid HTTP header: b'Bearer {TOKEN}\\x01'",
    f"Got more than 8190 bytes when reading: b'Bearer {TOKEN[:60]}...'.",
    f"{{'Authorization': 'Basic {SECRET}'}}",
    f"('authorization', 'token {SECRET}')",
    f"GET /v1/wallets?a=1&access_token={SECRET}&b=2",
    f"/v1/wallets?api_key={SECRET}",
    f"GET /v1/wallets/{TOKEN} 404",
    f"bearer {SECRET}",
    f"GET /v1/streams/events?x=tst_{KEY_ID}_1767225600_{SECRET} 200",
    f"stream token tst_{KEY_ID}_1767225600_{SECRET}",
])
def test_secrets_are_redacted(line: str) -> None:
    cleaned = redact(line)
    assert SECRET[:8] not in cleaned
    assert "[redacted]" in cleaned
    assert redact(cleaned) == cleaned


def test_a_key_keeps_its_id_and_plain_lines_are_untouched() -> None:
    assert redact(f"key {TOKEN}") == f"key tly_{KEY_ID}_[redacted]"
    assert redact("missing Authorization header") == "missing Authorization header"
    assert redact("GET /v1/wallets 200") == "GET /v1/wallets 200"


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()], ids=["json", "text"])
def test_the_filter_covers_arguments_extra_fields_and_tracebacks(formatter: logging.Formatter) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("test_redact")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("header %s", f"Bearer {TOKEN}", extra={"path": f"/x/{TOKEN}", "request_id": None})
        try:
            raise ValueError(f"bad value b'Bearer {TOKEN}'")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert SECRET not in output and SECRET[:8] not in output
    assert output.count("[redacted]") >= 2
    assert "ValueError" in output
    if isinstance(formatter, JsonFormatter):
        lines = [json.loads(line) for line in output.splitlines()]
        assert lines[0]["path"] == f"/x/tly_{KEY_ID}_[redacted]"
        assert "ValueError" in lines[1]["exc"]
