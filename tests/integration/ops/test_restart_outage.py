"""A real PostgreSQL stopped (`pg_ctl stop -m fast`) and started again under a running app: commands
answer 503 unavailable (never 500) until it is back, then 200, and every background task recovers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import SUPERVISOR
from backend.embedded_pg import start_embedded
from tests.conftest import bearer, make_settings, mint_token
from tests.support import Client, eventually

PROBLEM = "application/problem+json"


async def credit(client: Client, wallet_id: str, opened: int, n: int) -> int:
    """A credit, then reads of the wallet (the log, its read model, the stats): each 200 or 503 (the
    credit's status is returned)."""
    response = await client.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 1, "reference": f"r{n}"})
    await ok_or_unavailable(response)
    for path in (f"/v1/wallets/{wallet_id}/state?at_position={opened}",
                 f"/v1/wallets/{wallet_id}?min_position={opened}", "/v1/stats",
                 f"/v1/streams/wallet-{wallet_id}/events"):
        await ok_or_unavailable(await client.get(path))
    return response.status


async def ok_or_unavailable(response: ClientResponse) -> None:
    if response.status != 200:
        body = await response.json(content_type=PROBLEM)
        assert (response.status, body["code"]) == (503, "unavailable"), (response.url, body)
        assert response.headers["Retry-After"]


async def test_commands_are_503_across_a_server_restart_and_tasks_recover(
    aiohttp_client: AiohttpClient, server_dir: Path
) -> None:
    server = await asyncio.to_thread(start_embedded, server_dir / "pg")
    try:
        app = create_app(make_settings(server.dsn("postgres"), listener_poll_s=0.1, wait_for_db_s=0))
        client: Client = await aiohttp_client(app)
        client.session.headers.update(bearer(await mint_token(app, "restart", ["admin"])))
        created = await client.post("/v1/wallets", json={"owner": "restart", "currency": "USD"})
        assert created.status == 201
        wallet_id = (await created.json())["wallet_id"]
        opened = int(created.headers["X-Position"])
        assert await credit(client, wallet_id, opened, 0) == 200  # the batcher now holds a pooled connection

        await asyncio.to_thread(server.kill)
        for n in range(1, 4):
            assert await credit(client, wallet_id, opened, n) == 503
        await asyncio.to_thread(server.restart)
        async with asyncio.timeout(30):
            n = 4
            while await credit(client, wallet_id, opened, n) != 200:  # 503s until it is back, never a 500
                n += 1
                await asyncio.sleep(0.05)
            for later in range(n + 1, n + 6):  # and stays up: no connection left broken in the pool
                assert await credit(client, wallet_id, opened, later) == 200

        supervisor = app[SUPERVISOR]
        await eventually(lambda: all(state.state == "running" for state in supervisor.tasks.values()),
                         timeout=30, interval=0.1, what="every background task running again")
        assert supervisor.tasks["listener"].restarts >= 1
        ready = await client.get("/health/ready")
        assert ready.status == 200
        await client.close()
    finally:
        await asyncio.to_thread(server.stop)
