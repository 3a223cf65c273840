"""One leader per projection across app instances; when it goes, a standby takes over within 5 s."""

from __future__ import annotations

from aiohttp import web
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import PROJECTIONS
from projections import registry
from projections.runner import LEADING, STANDBY
from projections.status import status
from tests.conftest import bearer, mint_token
from tests.integration.projections.harness import Node, settings_for
from tests.support import eventually


def states(app: web.Application) -> set[str]:
    return {runner.state for runner in app[PROJECTIONS].runners}


async def test_a_standby_app_takes_over_within_five_seconds(
        own_database_url: str, aiohttp_client: AiohttpClient) -> None:
    settings = settings_for(own_database_url, projection_standby_retry_s=1.0)
    first = await aiohttp_client(create_app(settings))

    async def first_leads() -> bool:
        return states(first.app) == {LEADING}

    await eventually(first_leads, what="the first app to lead every projection")
    second = await aiohttp_client(create_app(settings))

    async def second_stands_by() -> bool:
        return states(second.app) == {STANDBY}

    await eventually(second_stands_by, what="the second app to stand by")
    node = await Node.open(own_database_url)
    try:
        found = await status(node.pool, registry.names())
        pids = {r.backend_pid for r in first.app[PROJECTIONS].runners}
        assert all(s.state == "running" and s.leader_pid in pids for s in found)

        await first.close()  # the leading process goes away, and its sessions with it

        async def second_leads() -> bool:
            return states(second.app) == {LEADING}

        await eventually(second_leads, timeout=5.0, what="the standby to take over")
        headers = bearer(await mint_token(second.app, "operator", ["admin"]))
        response = await second.post("/v1/wallets", json={"owner": "alice", "currency": "USD"}, headers=headers)
        opened = await response.json()
        response = await second.get(f"/v1/wallets/{opened['wallet_id']}?min_position={opened['position']}",
                                    headers=headers)
        assert response.status == 200 and (await response.json())["owner"] == "alice"
        found = await status(node.pool, registry.names())
        pids = {r.backend_pid for r in second.app[PROJECTIONS].runners}
        assert all(s.state == "running" and s.leader_pid in pids for s in found)
    finally:
        await node.close()


async def test_an_idle_leader_whose_session_ends_leads_again_without_waiting_for_an_event(
        own_database_url: str, aiohttp_client: AiohttpClient) -> None:
    """The server ends the runners' sessions (an operator's pg_terminate_backend, a failover) while the
    log is quiet: each runner notices within its poll interval and takes the lead again on a new
    session, instead of believing it leads until the next event while no session holds the lock (the
    status would say `stopped` meanwhile, and a standby elsewhere would lead beside it)."""
    app = (await aiohttp_client(create_app(settings_for(own_database_url, projection_poll_s=0.2)))).app

    async def all_lead() -> bool:
        return states(app) == {LEADING} and None not in {r.backend_pid for r in app[PROJECTIONS].runners}

    await eventually(all_lead, what="every projection to lead")
    node = await Node.open(own_database_url)
    try:
        ended = {r.backend_pid for r in app[PROJECTIONS].runners}
        assert await node.pool.fetchval("select bool_and(pg_terminate_backend(p)) from unnest($1::int[]) p",
                                        list(ended))

        async def led_again() -> bool:
            found = await status(node.pool, registry.names())
            return all(s.state == "running" and s.leader_pid not in ended for s in found)

        await eventually(led_again, timeout=10.0, what="every projection led by a new session")
    finally:
        await node.close()
