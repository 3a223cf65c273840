"""Audit endpoints over real HTTP: history pages (stable while appends continue), one stream's history,
the NDJSON export, a wallet's state at a past position or time, verification; auth and validation."""

from __future__ import annotations

import asyncio
import io
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import POOL, STORE
from backend.audit import verify as verification
from backend.audit.export import ExportPage, export_page, read_export
from backend.audit.verify import Report, verify
from backend.domain.registry import LOGGED_TYPES
from backend.http import audit_params
from backend.http.audit import StateQuery, VerifyQuery
from backend.server.run import start
from backend.store.append import APPEND_LOCK_KEY
from backend.store.events import ANY, NewEvent, Write
from backend.store.repository import Repository
from tests.conftest import bearer, make_settings, mint_token
from tests.integration.audit.support import fill_log, tamper
from tests.support import Client, advisory_lock_waiters, eventually

PROBLEM = "application/problem+json"


class Auditor:
    def __init__(self, client: Client, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    async def get(self, path: str, params: dict[str, Any] | None = None, *, status: int = 200) -> Any:
        response = await self.client.get(path, params=params, headers=self.headers)
        text = await response.text()
        assert response.status == status, text
        if status >= 400:
            assert response.content_type == PROBLEM, text
        return await response.json(content_type=None)

    async def invalid(self, path: str, params: dict[str, Any], field: str) -> None:
        body = await self.get(path, params, status=400)
        assert body["code"] == "validation_error"
        assert field in [error["field"] for error in body["errors"]], body


@pytest.fixture
async def auditor(client: Client) -> Auditor:
    return Auditor(client, bearer(await mint_token(client.app, "auditor", ["audit:read"])))


@pytest.fixture
async def admin(client: Client, admin_headers: dict[str, str]) -> Auditor:
    return Auditor(client, admin_headers)


def probe_streams(count: int) -> tuple[str, list[str]]:
    """Streams of this test's own; type AuditProbe is one no read model but stats cares about."""
    prefix = f"auditprobe-{uuid.uuid4().hex}-"
    return prefix, [f"{prefix}{n}" for n in range(count)]


# ---------------------------------------------------------------- the global log


async def test_paging_is_stable_while_appends_continue(client: Client, auditor: Auditor) -> None:
    store = client.app[STORE]
    prefix, streams = probe_streams(5)
    appended: list[int] = []
    done = asyncio.Event()

    async def appender() -> None:
        for n in range(40):
            writes = [Write(s, ANY, [NewEvent("AuditProbe", {"n": n})]) for s in streams[: 1 + n % len(streams)]]
            result = await store.append(writes)
            appended.extend(p for s in result.streams for p in s.positions)
            await asyncio.sleep(0)
        done.set()

    task = asyncio.create_task(appender())
    seen: list[int] = []
    cursor, pages_while_appending = 0, 0
    async with asyncio.timeout(60):
        while True:
            finished = done.is_set()
            page = await auditor.get("/v1/events", {"cursor": cursor, "limit": 7, "stream_prefix": prefix})
            positions = [e["position"] for e in page["data"]]
            assert positions == sorted(positions) and all(p > cursor for p in positions)
            assert all(e["stream_id"].startswith(prefix) for e in page["data"])
            assert int(page["next_cursor"]) >= cursor and page["head"] >= int(page["next_cursor"])
            seen.extend(positions)
            cursor = int(page["next_cursor"])
            pages_while_appending += not finished
            if finished and not page["has_more"]:
                break
    await task
    assert seen == sorted(appended), "every appended event exactly once, in order"
    assert pages_while_appending > 3


def wallet_streams(count: int) -> tuple[str, list[str]]:
    """Wallet streams of this test's own, sharing a prefix: a filter by type takes only the names the log
    holds, so these carry real, well-formed wallet events, which the read models fold like any other."""
    prefix = f"wallet-{uuid.uuid4().hex[:8]}"
    return prefix, [f"{prefix}{str(uuid.uuid4())[8:]}" for _ in range(count)]


OCCURRED = {"occurred_at": "2026-01-01T00:00:00+00:00"}  # every domain event's data carries it
WALLET_EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("WalletOpened", {"owner": "auditor", "currency": "USD", **OCCURRED}),
    ("WalletCredited", {"amount": 100, "reference": "audit", **OCCURRED}),
    ("WalletDebited", {"amount": 1, "reference": "audit", **OCCURRED}),
]


async def test_filters_by_type_and_recorded_time(client: Client, auditor: Auditor) -> None:
    store = client.app[STORE]
    prefix, streams = wallet_streams(2)
    for n in range(6):  # one append per call: each gets its own, later recorded_at
        await store.append([Write(streams[n % 2], ANY, [NewEvent(*WALLET_EVENTS[n // 2])])])
    everything = (await auditor.get("/v1/events", {"stream_prefix": prefix}))["data"]
    assert [(e["stream_id"], e["version"]) for e in everything] == [(streams[n % 2], 1 + n // 2) for n in range(6)]
    positions = [e["position"] for e in everything]

    credits = await auditor.get("/v1/events", {"stream_prefix": prefix, "types": "WalletCredited,DepositExpired"})
    assert [e["position"] for e in credits["data"]] == positions[2:4]

    middle = everything[3]["recorded_at"]
    later = await auditor.get("/v1/events", {"stream_prefix": prefix, "from_time": middle})
    assert [e["position"] for e in later["data"]] == positions[3:]
    earlier = await auditor.get("/v1/events", {"stream_prefix": prefix, "to_time": middle})
    assert [e["position"] for e in earlier["data"]] == positions[:3]
    assert earlier["next_cursor"] == str(everything[2]["position"]) and not earlier["has_more"]
    window = await auditor.get("/v1/events", {"stream_prefix": prefix, "from_time": everything[1]["recorded_at"],
                                              "to_time": middle, "types": "WalletCredited"})
    assert [e["position"] for e in window["data"]] == positions[2:3]


async def test_an_unknown_event_type_is_a_400_not_an_empty_page(auditor: Auditor) -> None:
    """A typo in `types` would match nothing, ever: an empty page would look like a quiet log."""
    body = await auditor.get("/v1/events", {"types": "WalletCredited,WalletCreditted"}, status=400)
    assert (body["code"], body["field"], body["unknown"]) == ("unknown_event_type", "types", ["WalletCreditted"])
    assert body["errors"] == [{"field": "types", "message": "unknown event type 'WalletCreditted'"}]
    every = await auditor.get("/v1/events", {"types": ",".join(sorted(LOGGED_TYPES)), "limit": 1})
    assert len(every["data"]) <= 1


async def test_event_shape(client: Client, auditor: Auditor) -> None:
    store = client.app[STORE]
    _, (stream,) = probe_streams(1)
    await store.append([Write(stream, ANY, [NewEvent("AuditProbe", {"b": 1, "a": "é"}, {"actor": "x"})])])
    (event,) = (await auditor.get(f"/v1/streams/{stream}/events"))["data"]
    assert list(event) == ["position", "stream_id", "version", "type", "data", "metadata", "event_id",
                           "recorded_at", "hash"]
    assert event["data"] == {"a": "é", "b": 1} and event["metadata"] == {"actor": "x"}
    assert len(event["hash"]) == 64 and event["recorded_at"].endswith("Z") and len(event["recorded_at"]) == 27
    datetime.fromisoformat(event["recorded_at"])


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": 0}, "limit"),
    ({"limit": 1001}, "limit"),
    ({"cursor": -1}, "cursor"),
    ({"cursor": "abc"}, "cursor"),
    ({"from_time": "2026-01-01T00:00:00"}, "from_time"),
    ({"to_time": "yesterday"}, "to_time"),
    ({"to_time": "0.5"}, "to_time"),  # pydantic alone would read digits as a Unix time
    ({"from_time": "1700000000"}, "from_time"),
    ({"stream_prefix": "x" * 300}, "stream_prefix"),
    ({"types": "A,,B"}, "types.1"),
    ({"bogus": 1}, "bogus"),
])
async def test_bad_log_queries_name_the_parameter(auditor: Auditor, params: dict[str, Any], field: str) -> None:
    await auditor.invalid("/v1/events", params, field)


async def test_a_page_holding_the_last_events_says_there_is_no_more(client: Client, auditor: Auditor) -> None:
    """has_more means more events were there past the page, as on every other list: a page that ends
    exactly with the last one is the last page, and its cursor already moves to the head."""
    prefix, (stream,) = probe_streams(1)
    await client.app[STORE].append([Write(stream, ANY, [NewEvent("AuditProbe", {"n": n}) for n in range(3)])])
    page = await auditor.get("/v1/events", {"stream_prefix": prefix, "limit": 3})
    assert [e["data"]["n"] for e in page["data"]] == [0, 1, 2]
    assert not page["has_more"] and page["next_cursor"] == str(page["head"])
    first = await auditor.get("/v1/events", {"stream_prefix": prefix, "limit": 2})
    assert first["has_more"] and first["next_cursor"] == str(page["data"][1]["position"])
    versions = await auditor.get(f"/v1/streams/{stream}/events", {"limit": 3})
    assert len(versions["data"]) == 3 and not versions["has_more"] and versions["next_cursor"] == "3"


async def test_a_cursor_beyond_the_head_is_refused(client: Client, auditor: Auditor) -> None:
    """next_cursor never passes the head: a cursor beyond it (another database, a typo) would answer
    empty pages, then skip every event up to it once the log grows."""
    _, (stream,) = probe_streams(1)
    appended = await client.app[STORE].append([Write(stream, ANY, [NewEvent("AuditProbe", {"n": 0})])])
    at_head = await auditor.get("/v1/events", {"cursor": appended.position})
    assert at_head["data"] == [] and int(at_head["next_cursor"]) >= appended.position
    await auditor.invalid("/v1/events", {"cursor": at_head["head"] + 1000}, "cursor")


@pytest.mark.parametrize("path", ["/v1/events?from_time=2026-01-01T00:00:00+01:00",
                                  f"/v1/wallets/{uuid.uuid4()}/state?as_of=2026-01-01T00:00:00.5+05:30"])
async def test_an_offset_whose_plus_became_a_space_says_so(auditor: Auditor, path: str) -> None:
    """An unescaped + in a query string reads as a space: the answer says to send it as %2B, instead of
    blaming "extra characters" in what looks like a valid time."""
    body = await auditor.get(path, status=400)
    (error,) = body["errors"]
    assert error["field"] in ("from_time", "as_of") and "%2B" in error["message"], body


async def test_a_repeated_parameter_is_rejected(auditor: Auditor) -> None:
    body = await auditor.get("/v1/events?cursor=1&cursor=2", status=400)
    assert body["errors"][0]["field"] == "cursor"


async def test_audit_scope_is_required(client: Client, auditor: Auditor) -> None:
    reader = bearer(await mint_token(client.app, "reader", ["wallets:read"]))
    paths = ["/v1/events", "/v1/events/export", f"/v1/streams/wallet-{uuid.uuid4()}/events",
             f"/v1/wallets/{uuid.uuid4()}/state?at_position=1", "/v1/audit/verify?stream=x"]
    for path in paths:
        assert (await client.get(path)).status == 401
        forbidden = await client.get(path, headers=reader)
        assert forbidden.status == 403 and (await forbidden.json())["code"] == "forbidden"


# ---------------------------------------------------------------- one stream


async def test_stream_history_pages_by_version(client: Client, auditor: Auditor) -> None:
    _, (stream,) = probe_streams(1)
    await client.app[STORE].append([Write(stream, ANY, [NewEvent("AuditProbe", {"n": n}) for n in range(5)])])
    page = await auditor.get(f"/v1/streams/{stream}/events", {"cursor": 1, "limit": 2})
    assert [e["version"] for e in page["data"]] == [2, 3]
    assert (page["stream_id"], page["next_cursor"], page["has_more"]) == (stream, "3", True)
    rest = await auditor.get(f"/v1/streams/{stream}/events", {"cursor": page["next_cursor"]})
    assert [e["version"] for e in rest["data"]] == [4, 5] and not rest["has_more"]
    empty = await auditor.get(f"/v1/streams/{stream}/events", {"cursor": 5})
    assert empty["data"] == [] and empty["next_cursor"] == "5" and not empty["has_more"]
    # A cursor past the last version was never answered: polling from it would skip versions 6 to 9.
    await auditor.invalid(f"/v1/streams/{stream}/events", {"cursor": 9}, "cursor")
    await auditor.get(f"/v1/streams/auditprobe-{uuid.uuid4().hex}/events", status=404)
    await auditor.invalid(f"/v1/streams/{stream}/events", {"cursor": -1}, "cursor")


# ---------------------------------------------------------------- export


async def test_export_streams_ndjson_that_verifies_and_matches_the_pages(client: Client,
                                                                         auditor: Auditor) -> None:
    store = client.app[STORE]
    _, streams = probe_streams(3)
    first = await store.append([Write(s, ANY, [NewEvent("AuditProbe", {"n": 0})]) for s in streams])
    after = first.position - 3
    for n in range(1, 4):
        await store.append([Write(s, ANY, [NewEvent("AuditProbe", {"n": n})]) for s in streams])

    response = await client.get("/v1/events/export", params={"after": after}, headers=auditor.headers)
    assert response.status == 200 and response.content_type == "application/x-ndjson"
    to = int(response.headers["X-Export-To"])
    body = await response.read()
    lines = body.splitlines()
    assert len(lines) == to - after and to >= after + 12
    report = Report(source="export", partial=True)
    await verify(read_export(io.BytesIO(body)), report, contiguous=True)
    assert report.ok and report.first_position == after + 1 and report.last_position == to

    page = await auditor.get("/v1/events", {"cursor": after, "limit": 5})
    assert [e["position"] for e in page["data"]] == list(range(after + 1, after + 6))
    exported = [orjson.loads(line) for line in lines[:5]]
    assert exported == page["data"]

    bounded = await client.get("/v1/events/export", params={"after": after, "to": after + 2},
                               headers=auditor.headers)
    assert len((await bounded.read()).splitlines()) == 2
    await auditor.invalid("/v1/events/export", {"to": -5}, "to")
    await auditor.invalid("/v1/events/export", {"to": to + 1000}, "to")  # a later export would differ


async def test_an_export_range_that_runs_backwards_is_refused(client: Client, auditor: Auditor) -> None:
    """(after, to] with after beyond to, or beyond the head, holds no event now and never will: a 400
    naming after, not a 200 whose X-Export-After and X-Export-To name a backwards range. An empty
    range (after = to) is one, and exports as such."""
    _, (stream,) = probe_streams(1)
    appended = await client.app[STORE].append([Write(stream, ANY, [NewEvent("AuditProbe", {"n": n})
                                                                   for n in range(2)])])
    head = appended.position
    await auditor.invalid("/v1/events/export", {"after": head + 1000}, "after")
    await auditor.invalid("/v1/events/export", {"after": head, "to": head - 1}, "after")
    empty = await client.get("/v1/events/export", params={"after": head - 1, "to": head - 1},
                             headers=auditor.headers)
    assert empty.status == 200 and await empty.read() == b""
    assert (empty.headers["X-Export-After"], empty.headers["X-Export-To"]) == (str(head - 1), str(head - 1))


async def test_an_export_the_database_fails_midway_is_cut_short(client: Client, auditor: Auditor,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Once the first lines are sent, an outage can only end the export early: the connection closes
    without the chunked body's last chunk, so no client takes it for complete, and nothing else is
    written into the body (no problem document in the middle of the NDJSON); a warning, no traceback."""
    store = client.app[STORE]
    _, streams = probe_streams(2)
    await store.append([Write(s, ANY, [NewEvent("AuditProbe", {"n": 0})]) for s in streams])

    async def first_page_then_lost(conn: Any, after: int, to: int) -> ExportPage | None:
        if after > 0:
            raise asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
        return await export_page(conn, after, to, page_size=1)

    monkeypatch.setattr("backend.http.audit.export_page", first_page_then_lost)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(f"GET /v1/events/export?after=0 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     f"Authorization: {auditor.headers['Authorization']}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), timeout=10)  # to the end: the server closes
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head, raw[:500]
    assert b'{"position":1,' in body
    assert b"HTTP/1.1" not in body and b"problem" not in body, body[-500:]
    assert not body.endswith(b"0\r\n\r\n"), "a cut export must not end like a complete one"
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert any("export" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


async def test_a_client_that_leaves_an_export_midway_is_no_database_outage(
        database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An auditor stopping a download (`curl ... | head`) is not the database failing: no `database
    unavailable` warning, and the request counts as the 200 it was, not as a 503 (which the 503-rate
    alert watches). Served as `serve` serves: a client leaving does not cancel the handler there."""
    pages = 0

    async def endless(conn: Any, after: int, to: int) -> ExportPage | None:
        """The first page, again and again."""
        nonlocal pages
        pages += 1
        await asyncio.sleep(0.005)
        return await export_page(conn, 0, to, page_size=1) if pages <= 2000 else None

    monkeypatch.setattr("backend.http.audit.export_page", endless)
    settings = make_settings(database_url, rate_limit_per_s=0, host="127.0.0.1", port=0)
    serving = await start(create_app(settings), settings)
    try:
        token = await mint_token(serving.runner.app, "auditor", ["audit:read"])
        reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
        writer.write(f"GET /v1/events/export?after=0 HTTP/1.1\r\nHost: t\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(100)
        writer.transport.abort()  # the client goes, mid-body

        async def counted() -> list[str]:
            reader, writer = await asyncio.open_connection("127.0.0.1", serving.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            text = (await reader.read()).decode()
            writer.close()
            return [line for line in text.splitlines()
                    if line.startswith("tally_http_requests_total") and 'route="/v1/events/export"' in line]

        lines = await eventually(counted, timeout=10, what="the export to be counted")
        assert [line.split(" ")[0] for line in lines] == [
            'tally_http_requests_total{method="GET",route="/v1/events/export",status="200"}'], lines
        assert not [r for r in caplog.records if "unavailable" in r.getMessage()], caplog.text
    finally:
        await serving.stop(5)


async def test_exports_their_clients_do_not_read_hold_no_database_connection(own_database_url: str) -> None:
    """An auditor's download that stalls (a slow link, a client that stopped reading) used to hold a
    connection of the pool until it ended: as many stalled exports as POOL_MAX_SIZE, from one audit:read
    key, stopped every command and made the process unready. A page's connection is now back in the pool
    before the page is written, so commands go on, and each export is whole once its client reads."""
    settings = make_settings(own_database_url, pool_max_size=2, rate_limit_per_s=0, host="127.0.0.1", port=0)
    serving = await start(create_app(settings), settings)
    stalled: list[socket.socket] = []
    try:
        app = serving.runner.app
        _, streams = probe_streams(40)  # a few MB: more than the sockets' buffers hold
        await app[STORE].append([Write(s, ANY, [NewEvent("AuditProbe", {"filler": "x" * 150_000})])
                                 for s in streams])
        auditor = await mint_token(app, "auditor", ["audit:read"])
        for _ in range(settings.pool_max_size + 1):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", serving.port))
            sock.send(f"GET /v1/events/export HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                      f"Authorization: Bearer {auditor}\r\n\r\n".encode())
            stalled.append(sock)
        admin = bearer(await mint_token(app, "ops", ["admin"]))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{serving.port}", headers=admin) as session:
            created = await asyncio.wait_for(session.post("/v1/wallets", json={"owner": "ops", "currency": "USD"}),
                                             timeout=20)  # held connections: the command waits for ever
            assert created.status == 201, await created.text()
            assert (await session.get("/health/ready")).status == 200

        reader, writer = await asyncio.open_connection(sock=stalled.pop())
        raw = await asyncio.wait_for(reader.read(), timeout=60)  # to the end: the server closes
        writer.close()
        assert raw.count(b'"type":"AuditProbe"') == 40 and raw.endswith(b"0\r\n\r\n"), raw[-200:]
    finally:
        for sock in stalled:
            sock.close()
        await serving.stop(5)


# ---------------------------------------------------------------- time travel


async def test_wallet_state_at_a_position_and_at_a_time(admin: Auditor, auditor: Auditor) -> None:
    client = admin.client
    opened = await (await client.post("/v1/wallets", json={"owner": "tt", "currency": "USD"},
                                      headers=admin.headers)).json()
    wid = opened["wallet_id"]
    credited = await (await client.post(f"/v1/wallets/{wid}/credits", json={"amount": 500, "reference": "a"},
                                        headers=admin.headers)).json()
    debited = await (await client.post(f"/v1/wallets/{wid}/debits", json={"amount": 120, "reference": "b"},
                                       headers=admin.headers)).json()
    path = f"/v1/wallets/{wid}/state"

    at_credit = await auditor.get(path, {"at_position": credited["position"]})
    assert (at_credit["balance"], at_credit["version"], at_credit["position"]) == (500, 2, credited["position"])
    assert (await auditor.get(path, {"at_position": debited["position"] - 1}))["balance"] == 500
    assert (await auditor.get(path, {"at_position": debited["position"]}))["available"] == 380
    assert (await auditor.get(path, {"at_position": opened["position"]}))["balance"] == 0
    await auditor.get(path, {"at_position": opened["position"] - 1}, status=404)

    history = (await auditor.get(f"/v1/streams/wallet-{wid}/events"))["data"]
    credit_time = datetime.fromisoformat(history[1]["recorded_at"])
    by_time = await auditor.get(path, {"as_of": history[1]["recorded_at"]})
    assert (by_time["balance"], by_time["version"], by_time["position"]) == (500, 2, credited["position"])
    before = (credit_time - timedelta(microseconds=1)).isoformat()
    assert (await auditor.get(path, {"as_of": before}))["balance"] == 0
    opened_time = datetime.fromisoformat(history[0]["recorded_at"])
    await auditor.get(path, {"as_of": (opened_time - timedelta(microseconds=1)).isoformat()}, status=404)
    now = await auditor.get(path, {"as_of": datetime.now(opened_time.tzinfo).isoformat()})
    assert (now["balance"], now["version"], now["position"]) == (380, 3, debited["position"])

    await auditor.invalid(path, {}, "at_position")
    await auditor.invalid(path, {"at_position": 1, "as_of": history[0]["recorded_at"]}, "at_position")
    await auditor.invalid(path, {"at_position": 2**62}, "at_position")
    await auditor.invalid(path, {"as_of": "2999-01-01T00:00:00Z"}, "as_of")
    await auditor.invalid(path, {"as_of": "2026-01-01T00:00:00"}, "as_of")
    await auditor.invalid(path, {"as_of": "1700000000"}, "as_of")
    await auditor.get(f"/v1/wallets/{uuid.uuid4()}/state", {"at_position": 1}, status=404)
    await auditor.get("/v1/wallets/not-a-uuid/state", {"at_position": 1}, status=404)



async def test_state_replays_take_one_connection_however_many_run(
        own_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wallet's state replays its whole stream on one connection, for as long as that takes on a wallet
    of millions of events. More of them at once than the pool's free connections used to take every one:
    commands waited and the process was unready. They now take their turn, one at a time, and wait
    holding none; each still answers in full."""
    # One connection is the append batcher's, one a replay's, one left for everything else.
    settings = make_settings(own_database_url, pool_max_size=3, rate_limit_per_s=0, host="127.0.0.1", port=0)
    serving = await start(create_app(settings), settings)
    release = asyncio.Event()
    replaying = most = arrived = 0
    real_as_of, real_query = Repository.as_of, audit_params.query

    async def slow_as_of(self: Repository, cls: Any, aggregate_id: uuid.UUID, **options: Any) -> Any:
        """As on a wallet of millions of events: the connection stays busy until the test lets it go."""
        nonlocal replaying, most
        replaying += 1
        most = max(most, replaying)
        try:
            await options["db"].fetchval("select 1")
            await release.wait()
            return await real_as_of(self, cls, aggregate_id, **options)
        finally:
            replaying -= 1

    def counted_query(request: web.Request, model: Any) -> Any:
        """The handler's first step: with as_of, from here to the pool's queue nothing waits, so once every
        replay has arrived, each has taken a connection or waits for its turn."""
        nonlocal arrived
        arrived += model is StateQuery
        return real_query(request, model)

    try:
        app = serving.runner.app
        auditor = bearer(await mint_token(app, "auditor", ["audit:read"]))
        admin = bearer(await mint_token(app, "ops", ["admin"]))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{serving.port}") as session:
            async def open_wallet() -> str:
                async with session.post("/v1/wallets", json={"owner": "ops", "currency": "USD"},
                                        headers=admin) as reply:
                    assert reply.status == 201, await reply.text()
                    return str((await reply.json())["wallet_id"])

            wallet = await open_wallet()  # the batcher now holds its connection
            monkeypatch.setattr(Repository, "as_of", slow_as_of)
            monkeypatch.setattr("backend.http.audit.query", counted_query)

            async def state() -> int:
                params = {"as_of": datetime.now(UTC).isoformat()}
                async with session.get(f"/v1/wallets/{wallet}/state", params=params, headers=auditor) as reply:
                    body = await reply.json()
                    assert body["wallet_id"] == wallet and body["balance"] == 0, body
                    return reply.status

            replays = [asyncio.create_task(state()) for _ in range(settings.pool_max_size + 1)]
            await eventually(lambda: arrived == len(replays), timeout=10, what="every replay to arrive")
            await eventually(lambda: replaying, timeout=10, what="a replay to run")
            pool = app[POOL]
            assert pool.get_size() - pool.get_idle_size() == 2  # the batcher's and one replay's
            await asyncio.wait_for(open_wallet(), timeout=20)  # else waits for ever
            assert (await session.get("/health/ready")).status == 200
            release.set()
            assert await asyncio.gather(*replays) == [200] * len(replays)
            assert most == 1
    finally:
        release.set()
        await serving.stop(5)


async def test_state_as_of_a_time_says_whether_it_is_final(admin: Auditor, auditor: Auditor,
                                                            database_url: str) -> None:
    """An append plans its recorded_at before it takes the store's lock, so one in flight can still
    commit an event recorded before a recent as_of: that answer is not final until the log holds an
    event recorded after as_of; at_position always is."""
    client = admin.client
    opened = await (await client.post("/v1/wallets", json={"owner": "final", "currency": "USD"},
                                      headers=admin.headers)).json()
    wid, path = opened["wallet_id"], f"/v1/wallets/{opened['wallet_id']}/state"
    assert (await auditor.get(path, {"at_position": opened["position"]}))["final"] is True
    holder = await asyncpg.connect(database_url)
    try:
        async with holder.transaction():
            await holder.execute("select pg_advisory_xact_lock($1)", APPEND_LOCK_KEY)
            credit = asyncio.ensure_future(client.post(f"/v1/wallets/{wid}/credits",
                                                       json={"amount": 5, "reference": "in flight"},
                                                       headers=admin.headers))
            await eventually(lambda: advisory_lock_waiters(holder))
            as_of = datetime.now(UTC).isoformat()
            during = await auditor.get(path, {"as_of": as_of})
            assert (during["balance"], during["final"]) == (0, False)
        assert (await credit).status == 200
        after = await auditor.get(path, {"as_of": as_of})
        assert (after["balance"], after["final"]) == (5, False)  # the credit was recorded before as_of
        later = await client.post(f"/v1/wallets/{wid}/credits", json={"amount": 7, "reference": "later"},
                                  headers=admin.headers)
        assert later.status == 200
        settled = await auditor.get(path, {"as_of": as_of})
        assert (settled["balance"], settled["final"]) == (5, True)
    finally:
        await holder.close()


# ---------------------------------------------------------------- verification


async def test_verify_one_stream(admin: Auditor, auditor: Auditor) -> None:
    opened = await (await admin.client.post("/v1/wallets", json={"owner": "v", "currency": "USD"},
                                            headers=admin.headers)).json()
    report = await auditor.get("/v1/audit/verify", {"stream": f"wallet-{opened['wallet_id']}"})
    assert report["ok"] and report["events_checked"] == 1 and report["streams_checked"] == 1
    assert report["breaks"] == [] and report["source"] == "database"
    await auditor.get("/v1/audit/verify", {"stream": f"wallet-{uuid.uuid4()}"}, status=404)


async def test_verify_the_whole_log_and_find_tampering(aiohttp_client: AiohttpClient, own_database_url: str,
                                                       own_pool: asyncpg.Pool) -> None:
    log = await fill_log(own_pool, streams=4, versions=3)
    client = await aiohttp_client(create_app(make_settings(own_database_url)))
    headers = bearer(await mint_token(client.app, "auditor", ["audit:read"]))
    clean = await (await client.get("/v1/audit/verify", headers=headers)).json()
    assert clean["ok"] and clean["events_checked"] >= log.events and clean["first_position"] == 1

    victim = log.streams[1]
    await tamper(own_database_url, "update events set data = jsonb_set(data, '{amount}', '7') "
                          "where stream_id = $1 and version = 2", victim)
    found = await (await client.get("/v1/audit/verify", headers=headers)).json()
    assert not found["ok"] and found["break_count"] == 1
    assert {k: found["breaks"][0][k] for k in ("kind", "stream_id", "version", "position")} == {
        "kind": "hash_mismatch", "stream_id": victim, "version": 2, "position": log.position(victim, 2)}


async def test_whole_log_verifications_take_one_connection_however_many_run(
        own_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-log verification keeps its connection for as long as it reads the log (a minute and more
    on a big one). As many at once as POOL_MAX_SIZE, from one audit:read key, used to hold every
    connection: commands waited and the process was unready. They now take their turn, one at a time,
    and wait holding none; each still answers in full."""
    # One connection is the append batcher's, one a verification's, one left for everything else.
    settings = make_settings(own_database_url, pool_max_size=3, rate_limit_per_s=0, host="127.0.0.1", port=0)
    serving = await start(create_app(settings), settings)
    release = asyncio.Event()
    real_verify = verification.verify_database

    async def slow_verify(conn: Any, stream: str | None) -> Report:
        """As on a log of millions of events: the connection stays busy until the test lets it go."""
        await conn.fetchval("select 1")
        await release.wait()
        return await real_verify(conn, stream)

    monkeypatch.setattr("backend.http.audit.verify_database", slow_verify)
    arrived = 0
    real_query = audit_params.query

    def counted_query(request: web.Request, model: Any) -> Any:
        """The handler's first step: from here to the pool's queue nothing waits, so once every
        verification has arrived, each has taken a connection or waits for its turn."""
        nonlocal arrived
        arrived += model is VerifyQuery
        return real_query(request, model)

    monkeypatch.setattr("backend.http.audit.query", counted_query)
    try:
        app = serving.runner.app
        auditor = bearer(await mint_token(app, "auditor", ["audit:read"]))
        admin = bearer(await mint_token(app, "ops", ["admin"]))
        async with aiohttp.ClientSession(f"http://127.0.0.1:{serving.port}") as session:
            async def whole_log() -> int:
                async with session.get("/v1/audit/verify", headers=auditor) as reply:
                    body = await reply.json()
                    assert body["ok"] and body["stream"] is None, body
                    return reply.status

            verifications = [asyncio.create_task(whole_log()) for _ in range(settings.pool_max_size)]
            await eventually(lambda: arrived == len(verifications), timeout=10, what="every verification to arrive")
            created = await asyncio.wait_for(session.post("/v1/wallets", json={"owner": "ops", "currency": "USD"},
                                                          headers=admin), timeout=20)  # else waits for ever
            assert created.status == 201, await created.text()
            assert (await session.get("/health/ready")).status == 200
            release.set()
            assert await asyncio.gather(*verifications) == [200] * len(verifications)
    finally:
        release.set()
        await serving.stop(5)
