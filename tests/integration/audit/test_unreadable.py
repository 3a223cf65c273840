"""An event whose recorded_at someone with database access set to 'infinity' or '-infinity' (no append
writes one): every read that needs that time answers a clear 502 unreadable_event naming the position,
logs one warning line without a traceback, and the audit CLI prints one line; `audit verify` already
reports the event as a hash_mismatch (tests/integration/audit/test_verify.py)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from tests.conftest import bearer, make_settings, mint_token
from tests.integration.audit.support import audit_cli, tamper
from tests.sse_client import Stream
from tests.support import Client

pytestmark = pytest.mark.timeout(120)


async def tampered_wallet(client: Client, dsn: str, moment: str) -> tuple[dict[str, str], str, int]:
    """A wallet opened and credited over HTTP, its credit's recorded_at then set to `moment`."""
    admin = bearer(await mint_token(client.app, "ops", ["admin"]))
    opened = await client.post("/v1/wallets", json={"owner": "ops", "currency": "USD"}, headers=admin)
    wallet_id = (await opened.json())["wallet_id"]
    credited = await client.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 5, "reference": "r"},
                                 headers=admin)
    position = (await credited.json())["position"]
    await tamper(dsn, f"update events set recorded_at = '{moment}' where position = $1", position)
    return admin, wallet_id, position


def unreadable_warnings(caplog: pytest.LogCaptureFixture, position: int) -> list[logging.LogRecord]:
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], "no error, no traceback"
    found = [r for r in caplog.records if "unreadable event" in r.getMessage()]
    assert all(getattr(r, "position", None) == position and r.levelno == logging.WARNING for r in found)
    return found


@pytest.mark.parametrize("moment", ["infinity", "-infinity"])
async def test_a_wallet_state_over_an_infinite_time_is_a_502_naming_the_event(
        own_database_url: str, aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture, moment: str) -> None:
    client = await aiohttp_client(create_app(make_settings(own_database_url)))
    admin, wallet_id, position = await tampered_wallet(client, own_database_url, moment)
    caplog.clear()
    now = datetime.now(UTC).isoformat()
    for params in ({"as_of": now}, {"at_position": str(position)}):
        answer = await client.get(f"/v1/wallets/{wallet_id}/state", params=params, headers=admin)
        body: dict[str, Any] = await answer.json(content_type=None)
        assert (answer.status, answer.content_type) == (502, "application/problem+json"), body
        assert (body["code"], body["position"]) == ("unreadable_event", position), body
        assert f"position {position}" in body["detail"]
    assert len(unreadable_warnings(caplog, position)) == 2
    # the read model never needed the time; the commands neither
    assert (await client.get(f"/v1/wallets/{wallet_id}", headers=admin)).status == 200
    again = await client.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 1, "reference": "s"}, headers=admin)
    assert again.status == 200


@pytest.mark.parametrize("moment", ["infinity", "-infinity"])
async def test_a_wallet_stream_reaching_an_infinite_time_ends_with_one_warning(
        own_database_url: str, aiohttp_client: AiohttpClient, caplog: pytest.LogCaptureFixture, moment: str) -> None:
    client = await aiohttp_client(create_app(make_settings(own_database_url)))
    admin, wallet_id, position = await tampered_wallet(client, own_database_url, moment)
    caplog.clear()
    sse = Stream(await client.get(f"/v1/streams/wallets/{wallet_id}", headers=admin))
    assert sse.status == 200
    seen = await sse.drain_to_end()  # ends, where it would have sent the tampered event (never past it)
    assert all(int(m.last_id) < position for m in seen)
    assert len(unreadable_warnings(caplog, position)) == 1


@pytest.mark.parametrize("moment", ["infinity", "-infinity"])
async def test_audit_replay_over_an_infinite_time_is_one_line(
        own_database_url: str, aiohttp_client: AiohttpClient, moment: str) -> None:
    client = await aiohttp_client(create_app(make_settings(own_database_url)))
    _, wallet_id, position = await tampered_wallet(client, own_database_url, moment)
    done = await audit_cli("replay", "--stream", f"wallet-{wallet_id}", database_url=own_database_url)
    assert done.returncode == 2, done.stderr  # as a stream that does not replay
    assert done.stderr == (f"tally: error: the event at position {position} cannot be read: "
                           "its recorded_at is infinite\n")
    assert "position" in done.stdout  # the events before it were shown
