"""Readiness follows the database: 503 while it is down, 200 again once it is back, unaided."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.embedded_pg import start_embedded
from tests.conftest import make_settings
from tests.support import Client, eventually


async def wait_for_status(client: Client, status: int, timeout: float = 30.0) -> None:
    seen: list[int] = []

    async def answers() -> bool:
        response = await client.get("/health/ready")
        seen.append(response.status)
        return response.status == status

    await eventually(answers, timeout=timeout, interval=0.2, what=lambda: f"readiness {status} (seen {seen})")


async def test_readiness_turns_503_when_database_stops_and_200_after_restart(
    aiohttp_client: AiohttpClient, server_dir: Path
) -> None:
    # A server of this test's own, so stopping it disturbs nothing else.
    server = await asyncio.to_thread(start_embedded, server_dir / "pg")
    try:
        client = await aiohttp_client(create_app(make_settings(server.dsn("postgres"))))
        await wait_for_status(client, 200)

        await asyncio.to_thread(server.kill)
        response = await client.get("/health/ready")
        assert response.status == 503
        body = await response.json(content_type="application/problem+json")
        assert body["code"] == "unavailable"
        assert response.headers["Retry-After"]

        await asyncio.to_thread(server.restart)
        await wait_for_status(client, 200)
        await client.close()
    finally:
        await asyncio.to_thread(server.stop)
