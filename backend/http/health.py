"""Liveness (the process answers), readiness (the database answers within a timeout and takes writes, no
background task stuck) and metrics."""

from __future__ import annotations

import asyncio

from aiohttp import web

from backend.appkeys import METRICS, POOL, READ_POOLS, SETTINGS, SUPERVISOR
from backend.db import TAKES_NO_WRITES, Connection, describe, is_unavailable, read_only
from backend.http.endpoint import Header, endpoint
from backend.http.problems import Problem
from projections import registry
from projections.status import status

routes = web.RouteTableDef()


@routes.get("/health/live")
@endpoint(public=True)
async def live(request: web.Request) -> web.Response:
    """The process answers."""
    return web.json_response({"status": "live"})


@routes.get("/health/ready")
@endpoint(public=True, errors=("unavailable",))
async def ready(request: web.Request) -> web.Response:
    """The database answers within the timeout and takes writes, and no background task is stuck (else
    503); each projection's lag and each background task's state.

    A task is stuck when it has kept failing, restart after restart, for longer than the supervisor's
    stuck_after_s (30 s): with the database answering, a LISTEN connection or stream tail that cannot
    recover means this process serves stale waits and silent streams, so it leaves the rotation. A
    shorter outage only shows in `tasks` (state "failing", consecutive_failures). With read replicas,
    `checks.replicas` reports each one's lag and whether it serves reads (not gating either), in a 503's
    problem body too: an outage of the primary is when operators most need the replicas' view."""
    timeout = request.app[SETTINGS].ready_timeout_s
    try:
        async with asyncio.timeout(timeout):
            async with request.app[POOL].acquire() as conn:
                unwritable = await read_only(conn)
                lag = await projection_lag(conn)
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        raise unready(request, f"database check failed: {describe(exc)}") from None
    if unwritable:  # reads and streams still work, but no command can commit
        raise unready(request, f"the database {TAKES_NO_WRITES}")
    supervisor = request.app[SUPERVISOR]
    stuck = supervisor.stuck()
    if stuck:
        raise unready(request, f"background tasks failing for over {supervisor.stuck_after_s:g} s: "
                      + ", ".join(f"{name} ({supervisor.tasks[name].last_error})" for name in stuck))
    checks: dict[str, object] = {"database": "ok", "projections": lag, **replica_checks(request)}
    return web.json_response({"status": "ready", "checks": checks, "tasks": supervisor.report()})


def replica_checks(request: web.Request) -> dict[str, object]:
    """`{"replicas": each one's report}` with read replicas, else empty. Informative, never gating: a
    replica out of use only moves reads to the primary."""
    pools = request.app.get(READ_POOLS)
    return {"replicas": pools.report()} if pools is not None and pools.replicas else {}


def unready(request: web.Request, detail: str) -> Problem:
    """503 unavailable, carrying the replicas' checks (under `checks`) when there are replicas."""
    replicas = replica_checks(request)
    return Problem(503, "unavailable", detail, headers={"Retry-After": "1"},
                   extra={"checks": replicas} if replicas else None)


async def projection_lag(conn: Connection) -> dict[str, dict[str, object]]:
    """Each read model's state and lag. Reported, not gating: a lagging or failed projection slows or
    stops its reads (which answer 503 past their wait), while commands and streams still work."""
    return {
        s.name: {"state": s.state, "lag_events": s.lag_events, "lag_s": s.lag_s}
        for s in await status(conn, registry.names())
    }


@routes.get("/metrics")
@endpoint(public=True, content_type="text/plain", headers=(Header("X-Content-Type-Options", "nosniff"),))
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format (version 0.0.4), from this process's own registry."""
    body = await request.app[METRICS].render(request.app[SETTINGS].ready_timeout_s)
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})
