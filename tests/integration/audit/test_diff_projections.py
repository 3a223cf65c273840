"""`audit diff-projections`: the live read models equal a rebuild from the log; a corrupted, a deleted
and an invented read-model row are each reported, and nothing is left behind."""

from __future__ import annotations

import uuid

import asyncpg
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.audit.projections_diff import SCRATCH_PREFIX, DiffReport, diff_all
from projections.registry import names
from projections.service import connector
from tests.conftest import bearer, make_settings, mint_token
from tests.integration.audit.support import audit_cli
from tests.support import Client, eventually


async def workload(client: Client, headers: dict[str, str]) -> list[str]:
    wallets = []
    for owner in ("ann", "bob", "cy"):
        made = await client.post("/v1/wallets", json={"owner": owner, "currency": "USD"}, headers=headers)
        wallets.append((await made.json())["wallet_id"])
    for wid in wallets:
        for path, body in ((f"/v1/wallets/{wid}/credits", {"amount": 1000, "reference": "seed"}),
                           (f"/v1/wallets/{wid}/debits", {"amount": 100, "reference": "buy"}),
                           (f"/v1/wallets/{wid}/locks", {"amount": 50, "reason": "escrow"}),
                           (f"/v1/wallets/{wid}/reservations", {"amount": 70, "ttl_seconds": 3600})):
            response = await client.post(path, json=body, headers=headers)
            assert response.status in (200, 201), await response.text()
    return wallets


async def diff(dsn: str) -> DiffReport:
    return await diff_all(connector(dsn, make_settings(dsn)))


async def test_live_read_models_match_a_rebuild_and_corruption_is_reported(
    aiohttp_client: AiohttpClient, own_database_url: str, own_pool: asyncpg.Pool
) -> None:
    settings = make_settings(own_database_url, rate_limit_per_s=0, projection_poll_s=0.2)
    client = await aiohttp_client(create_app(settings))
    headers = bearer(await mint_token(client.app, "ops", ["admin"]))
    wallets = await workload(client, headers)

    async def caught_up() -> bool:
        head = await own_pool.fetchval("select coalesce(max(position), 0) from events")
        rows = await own_pool.fetch("select position from projection_checkpoints where name = any($1)", names())
        return len(rows) == len(names()) and all(r["position"] >= head for r in rows)

    await eventually(caught_up, what="every projection at the head")
    healthy = await diff(own_database_url)
    assert healthy.ok, [t.describe() for t in healthy.differences] + list(healthy.errors.values())
    assert {t.projection for t in healthy.tables} == set(names())

    corrupted = uuid.UUID(wallets[1])
    await own_pool.execute("update wallet_balances set balance = balance + 1 where wallet_id = $1", corrupted)
    await own_pool.execute("delete from wallet_balances where wallet_id = $1", uuid.UUID(wallets[2]))
    await own_pool.execute("insert into stats_event_types (type, count) values ('Invented', 1)")

    found = await diff(own_database_url)
    assert not found.ok and not found.errors
    shown = {(t.projection, t.table): [(r.kind, r.key) for r in t.rows] for t in found.differences}
    assert shown == {
        ("balances", "wallet_balances"): [("changed", {"wallet_id": str(corrupted)}),
                                          ("missing", {"wallet_id": wallets[2]})],
        ("stats", "stats_event_types"): [("extra", {"type": "Invented"})],
    }
    (changed,) = [r for t in found.differences for r in t.rows if r.kind == "changed"]
    assert changed.live is not None and changed.rebuilt is not None
    assert changed.live["balance"] == changed.rebuilt["balance"] + 1

    result = await audit_cli("diff-projections", database_url=own_database_url)
    assert result.returncode == 1, result.stderr
    assert "balances.wallet_balances" in result.stdout and "changed" in result.stdout
    leftovers = await own_pool.fetchval("select count(*) from pg_namespace where nspname like $1", SCRATCH_PREFIX + "%")
    assert leftovers == 0


async def test_projections_that_never_ran_compare_at_position_zero(own_database_url: str, own_pool: asyncpg.Pool
                                                                   ) -> None:
    await own_pool.execute("delete from projection_checkpoints")
    report = await diff(own_database_url)
    assert report.ok and all(t.position == 0 for t in report.tables)
