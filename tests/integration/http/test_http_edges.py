"""Error format at the edges: unknown routes, wrong methods, bad JSON, request ids."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from backend.app import create_app
from backend.config import Settings
from backend.http.bodies import read_json
from tests.conftest import bearer, mint_token
from tests.integration.http.test_openapi import fill
from tests.support import Client

PROBLEM = "application/problem+json"


async def test_unknown_route_is_problem_json_404(client: Client) -> None:
    response = await client.get("/v1/nowhere")
    assert response.status == 404
    assert response.content_type == PROBLEM
    body = await response.json(content_type=PROBLEM)
    assert body["code"] == "not_found"
    assert body["status"] == 404
    assert {"type", "title", "detail"} <= body.keys()


async def test_wrong_method_is_problem_json_405_with_allow(client: Client) -> None:
    response = await client.delete("/health/live")
    assert response.status == 405
    assert response.content_type == PROBLEM
    assert "GET" in response.headers["Allow"]
    assert (await response.json(content_type=PROBLEM))["code"] == "method_not_allowed"


async def test_request_id_is_echoed_or_generated(client: Client) -> None:
    echoed = await client.get("/health/live", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["X-Request-ID"] == "abc-123"
    generated = await client.get("/health/live", headers={"X-Request-ID": "bad id with spaces"})
    assert len(generated.headers["X-Request-ID"]) == 32
    missing = await client.get("/nowhere")
    assert missing.headers["X-Request-ID"] == (await missing.json(content_type=PROBLEM))["request_id"]


class Echo(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    amount: int


async def echo(request: web.Request) -> web.Response:
    body = await read_json(request, Echo)
    return web.json_response(body.model_dump())


async def test_bad_json_and_invalid_fields_are_clear_4xx(aiohttp_client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings)
    app.router.add_post("/echo", echo)
    client = await aiohttp_client(app)
    client.session.headers.update(bearer(await mint_token(app, "someone", ["wallets:read"])))

    broken = await client.post("/echo", data=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status == 400
    assert (await broken.json(content_type=PROBLEM))["code"] == "validation_error"

    invalid = await client.post("/echo", json={"amount": 1.5, "extra": 1})
    assert invalid.status == 422
    body = await invalid.json(content_type=PROBLEM)
    assert body["code"] == "validation_error"
    assert {e["field"] for e in body["errors"]} == {"amount", "extra"}

    ok = await client.post("/echo", json={"amount": 7})
    assert ok.status == 200
    assert await ok.json() == {"amount": 7}


async def test_liveness_and_readiness(client: Client) -> None:
    assert (await client.get("/health/live")).status == 200
    ready = await client.get("/health/ready")
    assert ready.status == 200
    checks = (await ready.json())["checks"]
    assert checks["database"] == "ok"
    assert {"balances", "stats"} <= set(checks["projections"])
    assert all({"state", "lag_events", "lag_s"} <= set(p) for p in checks["projections"].values())


NUL_URLS = [
    "/v1/wallets?owner=a%00b",
    "/v1/api-keys?owner=a%00b",
    "/v1/events?stream_prefix=a%00b",
    "/v1/events?types=a%00b",
    "/v1/streams/a%00b/events",
    "/v1/audit/verify?stream=a%00b",
    "/v1/streams/events?stream=a%00b",
    "/v1/wallets/a%00b",
]


async def test_nul_in_a_path_or_query_is_a_400_not_a_500(client: Client) -> None:
    """PostgreSQL text cannot hold NUL: such a parameter reached a query and failed as a 500."""
    token = await mint_token(client.app, "nul-prober", ["admin", "audit:read"])
    for url in NUL_URLS:
        response = await client.get(url, headers=bearer(token))
        problem = await response.json(content_type=None)
        assert (response.status, problem["code"]) == (400, "validation_error"), (url, problem)


async def test_nul_in_a_body_field_is_a_422_naming_it_and_changes_nothing(client: Client) -> None:
    token = await mint_token(client.app, "nul-writer", ["admin"])
    created = await client.post("/v1/wallets", json={"owner": "nul-writer", "currency": "USD"},
                                headers=bearer(token))
    wallet = await created.json()
    refused = [
        ("/v1/wallets", {"owner": "a\x00b", "currency": "USD"}, "owner"),
        (f"/v1/wallets/{wallet['wallet_id']}/credits", {"amount": 5, "reference": "a\x00b"}, "reference"),
        (f"/v1/wallets/{wallet['wallet_id']}/locks", {"amount": 5, "reason": "\x00"}, "reason"),
        ("/v1/api-keys", {"owner": "nul-writer", "name": "a\x00", "scopes": ["wallets:read"]}, "name"),
    ]
    for path, body, field in refused:
        response = await client.post(path, json=body, headers=bearer(token))
        problem = await response.json(content_type=None)
        assert (response.status, problem["code"]) == (422, "validation_error"), (path, problem)
        assert [error["field"] for error in problem["errors"]] == [field]
    after = await client.get(f"/v1/wallets/{wallet['wallet_id']}", headers=bearer(token),
                             params={"min_position": str(wallet["position"])})
    assert (await after.json())["version"] == 1


async def test_a_query_parameter_the_endpoint_does_not_take_is_a_400_naming_it(client: Client) -> None:
    """A misspelt min_position read quietly as a plain read before: the client believed it read its writes."""
    token = await mint_token(client.app, "typo", ["admin"])
    created = await client.post("/v1/wallets", json={"owner": "typo", "currency": "USD"}, headers=bearer(token))
    wallet = await created.json()
    wallet_url = f"/v1/wallets/{wallet['wallet_id']}"
    refused = [
        ("GET", wallet_url, {"min_postion": str(wallet["position"])}, ["min_postion"]),
        ("GET", "/v1/wallets", {"owner": "typo", "page": "2", "sort": "id"}, ["page", "sort"]),
        ("GET", "/v1/stats", {"currency": "USD"}, ["currency"]),
        ("POST", f"{wallet_url}/credits", {"amount": "5"}, ["amount"]),
        ("GET", "/v1/streams/dashboard", {"after": "0"}, ["after"]),
    ]
    for method, url, params, unknown in refused:
        response = await client.request(method, url, params=params, headers=bearer(token),
                                         json={"amount": 5, "reference": "r"} if method == "POST" else None)
        problem = await response.json(content_type=None)
        assert (response.status, problem["code"]) == (400, "validation_error"), (url, problem)
        assert [error["field"] for error in problem["errors"]] == unknown, (url, problem)
        assert problem["field"] == unknown[0] and all(f"{name}: " in problem["detail"] for name in unknown)
    credited = await client.post(f"{wallet_url}/credits", json={"amount": 7, "reference": "r"}, headers=bearer(token))
    after = await client.get(wallet_url, params={"min_position": str((await credited.json())["position"])},
                             headers=bearer(token))
    assert (after.status, (await after.json())["balance"]) == (200, 7)  # the refused credit appended nothing
    listed = await client.get("/v1/wallets", params={"owner": "typo", "limit": "5", "cursor": ""},
                              headers=bearer(token))
    assert listed.status == 200
    for public in ("/health/live", "/openapi.json"):  # public endpoints take no input, so nothing to misread
        assert (await client.get(public, params={"cache": "1"})).status == 200


async def test_malformed_parameters_and_headers_are_400_listing_the_field(client: Client) -> None:
    """Every query parameter and header error has one shape, the audit queries' included."""
    token = await mint_token(client.app, "shapes", ["admin", "audit:read"])
    created = await client.post("/v1/wallets", json={"owner": "shapes", "currency": "USD"}, headers=bearer(token))
    wallet_url = f"/v1/wallets/{(await created.json())['wallet_id']}"
    cases = [
        ("GET", wallet_url, {"min_position": "-1"}, {}, "min_position"),
        ("GET", wallet_url, {"min_position": "1"}, {"X-Min-Position": "soon"}, "X-Min-Position"),  # not ignored
        ("GET", "/v1/wallets", {"limit": "0"}, {}, "limit"),
        ("GET", "/v1/wallets", {"cursor": "nope"}, {}, "cursor"),
        ("GET", "/v1/events", {"after": "-1"}, {}, "after"),
        ("GET", "/v1/events", {"from_time": "1700000000"}, {}, "from_time"),
        ("GET", "/v1/events", {"from_time": "9999-12-31T23:59:59-14:00"}, {}, "from_time"),  # no UTC equivalent
        ("GET", "/v1/events", {"to_time": "0001-01-01T00:00:00+14:00"}, {}, "to_time"),
        ("GET", f"{wallet_url}/state", {"as_of": "2999-01-01T00:00:00Z"}, {}, "as_of"),
        ("GET", "/v1/streams/events", {"types": ","}, {}, "types"),
        ("GET", "/v1/streams/events", {}, {"Last-Event-ID": "x"}, "Last-Event-ID"),
        ("POST", f"{wallet_url}/credits", {}, {"If-Match": "soon"}, "If-Match"),
        ("POST", f"{wallet_url}/credits", {}, {"Idempotency-Key": "x" * 256}, "Idempotency-Key"),
    ]
    for method, url, params, headers, field in cases:
        response = await client.request(method, url, params=params, headers={**bearer(token), **headers},
                                         json={"amount": 5, "reference": "r"} if method == "POST" else None)
        problem = await response.json(content_type=None)
        assert (response.status, problem["code"]) == (400, "validation_error"), (url, problem)
        assert problem["field"] == field and problem["errors"][0]["field"] == field, (url, problem)
        assert problem["detail"].startswith(f"{field}: "), problem


async def test_a_body_that_cannot_be_read_is_the_clients_400_not_a_500_or_an_outage(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    """A body whose Content-Encoding does not decode was a 500; one cut short by the client closing the
    connection was logged and counted as the database being unavailable (ConnectionResetError). Both
    are a 400 now, the connection closed after it, and no log line above INFO."""
    caplog.set_level(logging.INFO)
    token = await mint_token(client.app, "bodies", ["admin"])
    created = await client.post("/v1/wallets", json={"owner": "bodies", "currency": "USD"}, headers=bearer(token))
    wallet = f"/v1/wallets/{(await created.json())['wallet_id']}"
    assert client.server.host is not None and client.server.port is not None
    head = (f"POST {wallet}/credits HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\n").encode()
    for encoding in (b"gzip", b"deflate"):
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(head + b"Content-Encoding: " + encoding + b"\r\nContent-Length: 9\r\n\r\nnot gzip!")
        answer = await asyncio.wait_for(reader.read(), 5)  # to the end: the server closes the connection
        writer.close()
        status_line, _, body = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer, answer
        assert b'"code":"bad_request"' in body, answer
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(head + b'Content-Length: 50\r\n\r\n{"am')
    await writer.drain()
    await asyncio.sleep(0.3)  # the handler waits for the rest of the body
    writer.close()
    await asyncio.sleep(0.3)
    louder = [(r.name, r.getMessage()) for r in caplog.records if r.levelno > logging.INFO]
    assert louder == []
    balance = await client.get(wallet, headers=bearer(token))
    assert (await balance.json())["balance"] == 0


async def test_a_body_that_stops_arriving_is_a_408_and_changes_nothing(aiohttp_client, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """A key holder who sends a command's head and then its body a byte at a time, or part of it and
    then nothing, used to keep the connection and its handler for as long as it liked: thousands of
    such requests, within the key's rate limit, could take every file descriptor of the process. The
    body must now arrive within BODY_READ_TIMEOUT_S of the handler asking for it, else 408
    request_timeout, the connection closed, and nothing applied."""
    client: Client = await aiohttp_client(create_app(settings.model_copy(update={"body_read_timeout_s": 0.5})))
    token = await mint_token(client.app, "slow-body", ["admin"])
    created = await client.post("/v1/wallets", json={"owner": "slow-body", "currency": "USD"}, headers=bearer(token))
    wallet = f"/v1/wallets/{(await created.json())['wallet_id']}"
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(f"POST {wallet}/credits HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: 50\r\n\r\n{{\"amount\": 5".encode())
    answer = await asyncio.wait_for(reader.read(), 20)  # to the end: the server closes the connection
    writer.close()
    status_line, _, body = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer, answer
    assert b'"code":"request_timeout"' in body, answer
    balance = await client.get(wallet, headers=bearer(token))
    assert (await balance.json())["balance"] == 0


async def test_head_sends_no_body_on_any_get_route_and_the_connection_stays_usable(client: Client) -> None:
    """HEAD on a stream or the export used to send the body itself, unframed, so the next answer on that
    connection began with `retry: 3000`. They take no HEAD now (405); every other GET answers it bodiless."""
    token = await mint_token(client.app, "heads", ["admin", "audit:read"])
    doc = await (await client.get("/openapi.json")).json()
    assert client.server.host is not None and client.server.port is not None
    for path, item in doc["paths"].items():
        if "get" not in item:
            continue
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        try:
            writer.write(f"HEAD {fill(path)} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {token}\r\n\r\n"
                         "GET /health/live HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        first, _, rest = answer.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 "), (path, answer[:200])
        assert rest.startswith(b"HTTP/1.1 200 "), (path, answer[:400])  # nothing between the two heads
        if (path.startswith("/v1/streams/") and "{stream_id}" not in path) or path == "/v1/events/export":
            assert first.startswith(b"HTTP/1.1 405 "), (path, first)
