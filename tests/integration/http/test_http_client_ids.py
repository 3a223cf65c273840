"""Client-chosen ids that reach event metadata, stored replies and logs: X-Correlation-ID and
Idempotency-Key are checked (400 naming the header), X-Request-ID is replaced when it is not one.

Requests go out over a raw socket, so that a header can carry bytes no HTTP client library would send
(`c\\xff` reached the metadata encoder as a lone surrogate: a 500).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from backend.appkeys import STORE
from tests.conftest import bearer, mint_token
from tests.support import Client

BAD = [b"c\xff", b"c" * 8000, "c\u2028".encode(), "\u00e9".encode(), b"", b"a b"]


async def raw_request(client: Client, method: str, path: str, headers: dict[str, bytes],
                      body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """One HTTP/1.1 request with header values sent as given, byte for byte; (status, headers, JSON body)."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: test", b"Connection: close",
                 b"Content-Type: application/json", f"Content-Length: {len(body)}".encode()]
        lines += [name.encode() + b": " + value for name, value in headers.items()]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    received = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), received, orjson.loads(payload) if payload else None


@pytest.mark.parametrize("header", ["X-Correlation-ID", "Idempotency-Key"])
async def test_a_bad_client_id_header_is_400_naming_it_and_changes_nothing(client: Client, header: str) -> None:
    token = await mint_token(client.app, "ids", ["admin"])
    auth = {"Authorization": bearer(token)["Authorization"].encode()}
    opened = await client.post("/v1/wallets", json={"owner": "ids", "currency": "USD"}, headers=bearer(token))
    wallet = (await opened.json())["wallet_id"]
    head = await client.app[STORE].head()
    credit = orjson.dumps({"amount": 5, "reference": "r"})
    for value in BAD:
        status, _, problem = await raw_request(client, "POST", f"/v1/wallets/{wallet}/credits",
                                               {**auth, header: value}, credit)
        assert (status, problem["code"], problem["field"]) == (400, "validation_error", header), (value[:20], problem)
    assert await client.app[STORE].head() == head  # nothing appended
    status, _, credited = await raw_request(client, "POST", f"/v1/wallets/{wallet}/credits",
                                            {**auth, header: b"good-1.2:3_x"}, credit)
    assert (status, credited["balance"]) == (200, 5)


async def test_the_correlation_id_reaches_the_events_metadata(client: Client) -> None:
    token = await mint_token(client.app, "ids", ["admin"])
    headers = {**bearer(token), "X-Correlation-ID": "order-42:retry.1"}
    opened = await client.post("/v1/wallets", json={"owner": "ids", "currency": "USD"}, headers=headers)
    assert opened.status == 201
    events = await client.app[STORE].read_all(int(opened.headers["X-Position"]) - 1, 1)
    assert events[0].metadata["correlation_id"] == "order-42:retry.1"


async def test_a_bad_request_id_is_replaced_not_echoed(client: Client) -> None:
    for value in BAD:
        status, headers, _ = await raw_request(client, "GET", "/health/live", {"X-Request-ID": value})
        assert status == 200, value[:20]
        assert len(headers["x-request-id"]) == 32 and headers["x-request-id"].isalnum()
    status, headers, _ = await raw_request(client, "GET", "/health/live", {"X-Request-ID": b"mine-1"})
    assert (status, headers["x-request-id"]) == (200, "mine-1")
