"""Background tasks survive any error: the listener, hit by an error the old code did not expect,
reconnects and keeps delivering; restarts show in /metrics and /health/ready; a task that keeps failing
makes the process unready until it recovers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from asyncpg import exceptions as pgerr

from backend.app import create_app
from backend.appkeys import DATABASE_DSN, LISTENER, PROJECTIONS, REPOSITORY, SUPERVISOR
from backend.commands.api_keys import mint
from backend.store.append import NOTIFY_CHANNEL
from backend.store.tail import TASK as TAIL_TASK
from tests.conftest import bearer, make_settings, mint_token
from tests.integration.ops.test_db_faults import pooled_queries_raise
from tests.support import Client, eventually

STATE_ERROR = "cannot switch to state 12; another operation (2) is in progress"


def listener_fetchval_raises(monkeypatch: pytest.MonkeyPatch, should_fail: Callable[[], bool]) -> list[int]:
    """asyncpg's fetchval raises InternalClientError on the LISTEN connection whenever should_fail();
    returns the list of failures raised (it grows)."""
    original = asyncpg.Connection.fetchval
    raised: list[int] = []

    async def fetchval(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
        # asyncpg-stubs leave out _listeners: the channels this connection LISTENs on.
        if NOTIFY_CHANNEL in self._listeners and should_fail():  # type: ignore[attr-defined]
            raised.append(1)
            raise pgerr.InternalClientError(STATE_ERROR)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetchval", fetchval)
    return raised


@pytest.fixture
async def fast_client(aiohttp_client, database_url: str) -> Client:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(database_url, listener_poll_s=0.05))
    client: Client = await aiohttp_client(app)
    client.session.headers.update(bearer(await mint_token(app, "tasks", ["admin"])))
    return client


async def test_listener_reconnects_after_an_unlisted_error_and_keeps_delivering(
    fast_client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = fast_client.app
    listener = app[LISTENER]
    first_pid = listener.backend_pid()
    once = iter([True])
    raised = listener_fetchval_raises(monkeypatch, lambda: next(once, False))
    await eventually(lambda: bool(raised) and listener.reconnects >= 1)
    assert listener.backend_pid() not in (None, first_pid)

    head = listener.head
    waiter = asyncio.create_task(listener.wait_beyond(head, timeout=10))
    created = await fast_client.post("/v1/wallets", json={"owner": "tasks", "currency": "USD"})
    assert created.status == 201
    assert await waiter > head  # the new connection delivers

    metrics = await (await fast_client.get("/metrics")).text()
    assert 'tally_background_task_restarts_total{task="listener"} 1' in metrics
    assert "# TYPE tally_background_task_restarts_total counter" in metrics
    assert 'tally_background_task_restarts_total{task="sse-tail"} 0' in metrics

    await eventually(lambda: app[SUPERVISOR].tasks["listener"].state == "running")
    ready = await fast_client.get("/health/ready")
    assert ready.status == 200
    tasks = (await ready.json())["tasks"]
    assert tasks["listener"] == {"state": "running", "restarts": 1, "consecutive_failures": 0,
                                 "last_error": f"InternalClientError: {STATE_ERROR}"}
    assert {"idempotency-purge", "sse-tail", "dashboard-stats",
            "projection-balances"} <= tasks.keys()
    failed = [r for r in caplog.records if r.getMessage() == "background task failed, restarting it"]
    assert [(r.levelno, r.task) for r in failed] == [(logging.WARNING, "listener")]  # type: ignore[attr-defined]
    recovered = [r for r in caplog.records if r.getMessage() == "background task recovered"]
    assert [r.task for r in recovered] == ["listener"]  # type: ignore[attr-defined]


async def test_a_task_failing_for_too_long_makes_the_process_unready_until_it_recovers(
    fast_client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    app = fast_client.app
    supervisor = app[SUPERVISOR]
    supervisor.stuck_after_s = 0.5
    failing = True
    raised = listener_fetchval_raises(monkeypatch, lambda: failing)
    await eventually(lambda: supervisor.stuck() == ["listener"])

    ready = await fast_client.get("/health/ready")
    body = await ready.json(content_type="application/problem+json")
    assert (ready.status, body["code"]) == (503, "unavailable")
    assert ready.headers["Retry-After"] == "1"
    assert "listener (InternalClientError: cannot switch to state 12" in body["detail"]
    assert len(raised) >= 3
    failed = [r for r in caplog.records if r.getMessage() == "background task failed, restarting it"]
    assert len(failed) == 1  # once per outage, however many restarts

    failing = False
    await eventually(lambda: supervisor.tasks["listener"].state == "running")
    ready = await fast_client.get("/health/ready")
    assert ready.status == 200
    assert (await ready.json())["tasks"]["listener"]["restarts"] == len(raised)


async def test_the_revocation_watcher_survives_a_failed_read(
    fast_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = fast_client.app
    supervisor = app[SUPERVISOR]
    minted = mint("watched", "watched key", ["wallets:read"], None, datetime.now(UTC))
    await app[REPOSITORY].save(minted.key)

    async def probe() -> int:
        return (await fast_client.get("/v1/api-keys", headers=bearer(minted.token))).status

    assert await probe() == 403  # valid (cached from here on), but not admin
    with pooled_queries_raise(monkeypatch, pgerr.InternalClientError(STATE_ERROR)):
        # The watcher is a subscriber of the process's log tail: a head that moves makes the tail read
        # (its revocations), the read fails, and the tail's task restarts.
        notifier = await asyncpg.connect(app[DATABASE_DSN])  # not pooled: it keeps working
        try:
            await notifier.execute(f"notify {NOTIFY_CHANNEL}, '{app[LISTENER].head + 1}'")
        finally:
            await notifier.close()
        await eventually(lambda: supervisor.tasks[TAIL_TASK].restarts >= 1)
    minted.key.revoke(datetime.now(UTC))
    await app[REPOSITORY].save(minted.key)  # not through the endpoint: only the watcher can learn it
    async def refused() -> bool:
        return await probe() == 401

    await eventually(refused, timeout=10, interval=0.05, what="the revocation watcher to refuse the key")


async def test_a_projection_runner_losing_its_connection_at_commit_does_not_blame_the_event(
    fast_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The protocol-state error at commit is the connection's fault: the run ends and the batch is
    applied on a new connection, recording no failure (before, the runner retried the batch event by
    event on the broken connection, where the first event would fail and be recorded as failed)."""
    app = fast_client.app
    original = asyncpg.Connection.execute
    hit: list[str] = []

    async def execute(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> Any:
        # asyncpg-stubs leave out _proxy: None on a connection no pool lent out (the listener's, a runner's).
        if query == "commit" and self._proxy is None and not hit:  # type: ignore[attr-defined]
            hit.append(str(self.get_settings().application_name))
            raise pgerr.InternalClientError(STATE_ERROR)
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "execute", execute)
    created = await fast_client.post("/v1/wallets", json={"owner": "runner", "currency": "USD"})
    assert created.status == 201
    position = int(created.headers["X-Position"])
    await eventually(lambda: bool(hit))
    name = hit[0].removeprefix("tally-projection-").rsplit("-", 1)[0]
    service = app[PROJECTIONS]
    await eventually(lambda: service.runner(name).checkpoint >= position)
    assert app[SUPERVISOR].tasks[f"projection-{name}"].restarts == 1
    ready = await (await fast_client.get("/health/ready")).json()
    assert ready["checks"]["projections"][name]["state"] == "running"
    assert service.runner(name).error is None
