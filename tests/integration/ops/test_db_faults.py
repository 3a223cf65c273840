"""Every way a database outage reaches us is a 503 unavailable with Retry-After, never a 500; a bug in
our SQL or our use of asyncpg stays a 500. Real faults (a statement timeout, a terminated session, a
database that takes no writes) and, for the rest, each exception raised from asyncpg's own query
methods, through real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from asyncpg import exceptions as pgerr

from backend.app import create_app
from backend.db import is_unavailable
from backend.store.append import APPEND_LOCK_KEY
from tests.conftest import bearer, database_name, make_settings, mint_token
from tests.support import Client, advisory_lock_waiters, eventually, query_blocking

PROBLEM = "application/problem+json"
QUERY_METHODS = ("execute", "executemany", "fetch", "fetchval", "fetchrow")

OUTAGES = [
    pgerr.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    pgerr.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
    pgerr.InternalClientError("not connected"),
    pgerr.ProtocolError("unexpected message"),
    asyncpg.InterfaceError("pool is closing"),
    asyncpg.InterfaceError("pool is closed"),
    asyncpg.InterfaceError("cannot perform operation: connection is closed"),
    asyncpg.InterfaceError("cannot call Connection.fetch(): connection has been released back to the pool"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another server process"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.QueryCanceledError("canceling statement due to statement timeout"),
    pgerr.IdleSessionTimeoutError("terminating connection due to idle-session timeout"),
    pgerr.ConnectionFailureError("connection failure"),
    pgerr.InvalidPasswordError('password authentication failed for user "tally"'),
    pgerr.DiskFullError("could not extend file"),
    pgerr.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    pgerr.IdleInTransactionSessionTimeoutError("terminating connection due to idle-in-transaction timeout"),
    pgerr.LockNotAvailableError("canceling statement due to lock timeout"),
    pgerr.DeadlockDetectedError("deadlock detected"),
    pgerr.SerializationError("could not serialize access due to concurrent update"),
    pgerr.PostgresIOError("could not write to file \"base/16384/16385\": Input/output error"),
    pgerr.DataCorruptedError("invalid page in block 3 of relation base/16384/16385"),
    pgerr.InternalServerError("could not read block 0 in file \"base/16384/16385\""),
    ConnectionResetError("Connection reset by peer"),
    ConnectionRefusedError("Connection refused"),
    TimeoutError(),
]
BUGS = [
    asyncpg.UndefinedTableError('relation "walets" does not exist'),
    asyncpg.PostgresSyntaxError('syntax error at or near "form"'),
    pgerr.DataError("invalid input for query argument $1: 'x' ('str' object cannot be interpreted as an integer)"),
    asyncpg.InterfaceError("the server expects 2 arguments for this query, 1 was passed"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    pgerr.InternalClientError("no binary format encoder for type widget (OID 12345)"),
]


def ident(error: BaseException) -> str:
    return f"{type(error).__name__}:{str(error)[:24]}"


@contextlib.contextmanager
def pooled_queries_raise(monkeypatch: pytest.MonkeyPatch, error: BaseException,
                         pool: asyncpg.Pool | None = None) -> Iterator[None]:
    """Make asyncpg's query methods raise `error` on connections borrowed from a pool (the app's; the
    listener's and the projection runners' connections are their own and keep working); from `pool`
    only when given."""
    originals = {name: getattr(asyncpg.Connection, name) for name in QUERY_METHODS}

    def failing(name: str) -> Any:
        original = originals[name]

        async def method(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
            # asyncpg-stubs leave out _proxy: the pool's wrapper of a connection it lent out (None otherwise).
            proxy = self._proxy  # type: ignore[attr-defined]
            if proxy is not None and (pool is None or proxy._holder._pool is pool):
                raise error
            return await original(self, *args, **kwargs)

        return method

    with monkeypatch.context() as patch:
        for name in QUERY_METHODS:
            patch.setattr(asyncpg.Connection, name, failing(name))
        yield


async def assert_unavailable(response: Any) -> None:
    body = await response.json(content_type=None)
    assert response.status == 503, body
    assert response.content_type == PROBLEM
    assert body["code"] == "unavailable"
    assert int(response.headers["Retry-After"]) >= 1


@pytest.fixture
async def wallet_client(client: Client) -> tuple[Client, str]:
    """A client whose key is already verified (so requests reach the store) and a wallet to use."""
    client.session.headers.update(bearer(await mint_token(client.app, "faults", ["admin"])))
    created = await client.post("/v1/wallets", json={"owner": "faults", "currency": "USD"})
    assert created.status == 201, await created.text()
    return client, (await created.json())["wallet_id"]


@pytest.mark.parametrize("error", OUTAGES, ids=ident)
async def test_an_outage_error_is_503_for_commands_and_reads(
    wallet_client: tuple[Client, str], monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    client, wallet_id = wallet_client
    assert is_unavailable(error)
    with pooled_queries_raise(monkeypatch, error):
        await assert_unavailable(await client.post(f"/v1/wallets/{wallet_id}/credits",
                                                   json={"amount": 5, "reference": f"r-{uuid.uuid4()}"}))
        await assert_unavailable(await client.post("/v1/wallets", json={"owner": "faults", "currency": "EUR"}))
        await assert_unavailable(await client.get(f"/v1/wallets/{wallet_id}"))
        await assert_unavailable(await client.get("/health/ready"))
    # and once the database answers again, so do we
    credited = await client.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 5, "reference": "after"})
    assert credited.status == 200, await credited.text()


@pytest.mark.parametrize("error", BUGS, ids=ident)
async def test_a_bug_stays_a_500(
    wallet_client: tuple[Client, str], monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    client, wallet_id = wallet_client
    assert not is_unavailable(error)
    with pooled_queries_raise(monkeypatch, error):
        response = await client.get(f"/v1/wallets/{wallet_id}")
    body = await response.json(content_type=PROBLEM)
    assert (response.status, body["code"]) == (500, "internal_error")
    assert "Retry-After" not in response.headers


async def hold_append_lock(database_url: str) -> asyncpg.Connection:
    blocker = await asyncpg.connect(database_url)
    await blocker.execute("select pg_advisory_lock($1)", APPEND_LOCK_KEY)
    return blocker


@pytest.mark.parametrize("timeout", ["statement_timeout", "lock_timeout"])
async def test_a_credit_cancelled_by_a_timeout_is_503(  # type: ignore[no-untyped-def]
    aiohttp_client, own_database_url: str, timeout: str
) -> None:
    """A credit stuck behind the append lock longer than a timeout is cancelled by the server: Tally's
    STATEMENT_TIMEOUT_MS (57014), or a lock_timeout an operator set on the database (55P03). A 503 to
    retry, and nothing changed."""
    dsn, overrides = own_database_url, {}
    if timeout == "statement_timeout":
        overrides["statement_timeout_ms"] = 300
    else:
        await asyncio.to_thread(query_blocking, dsn, f"alter database {database_name(dsn)} set lock_timeout = 300")
    client: Client = await aiohttp_client(create_app(make_settings(dsn, **overrides)))
    client.session.headers.update(bearer(await mint_token(client.app, "timeout", ["admin"])))
    created = await client.post("/v1/wallets", json={"owner": "timeout", "currency": "USD"})
    wallet_id = (await created.json())["wallet_id"]
    blocker = await hold_append_lock(dsn)
    try:
        await assert_unavailable(await client.post(f"/v1/wallets/{wallet_id}/credits",
                                                   json={"amount": 1, "reference": "blocked"}))
    finally:
        await blocker.close()
    credited = await client.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 2, "reference": "free"})
    assert credited.status == 200, await credited.text()
    wallet = await client.get(f"/v1/wallets/{wallet_id}", headers={"X-Min-Position": credited.headers["X-Position"]})
    assert (await wallet.json())["balance"] == 2


async def test_a_session_terminated_mid_command_is_503(
    wallet_client: tuple[Client, str], database_url: str
) -> None:
    client, wallet_id = wallet_client
    blocker = await hold_append_lock(database_url)
    try:
        request = asyncio.create_task(client.post(f"/v1/wallets/{wallet_id}/credits",
                                                  json={"amount": 1, "reference": "terminated"}))
        waiting = await eventually(lambda: advisory_lock_waiters(blocker), timeout=10,
                                   what="the credit to wait for the append lock")
        assert await blocker.fetchval("select bool_and(pg_terminate_backend(p)) from unnest($1::int[]) p", waiting)
        await assert_unavailable(await request)
    finally:
        await blocker.close()
    credited = await client.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 1, "reference": "again"})
    assert credited.status == 200, await credited.text()


async def test_a_database_that_takes_no_writes_is_503_then_recovers(  # type: ignore[no-untyped-def]
    aiohttp_client, own_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The sessions Tally reconnects land on a server that refuses writes, as after a failover whose
    address still leads to the old primary, now a standby, or with default_transaction_read_only set for
    maintenance: commands and readiness answer 503 while reads go on; once the database takes writes
    again, commands do too, with no restart (the pool closes each read-only session it gets back).
    Nothing is logged as an error: an outage is a warning."""
    dsn, name = own_database_url, database_name(own_database_url)
    admin = await asyncpg.connect(dsn)
    pool_size = 4
    try:
        client: Client = await aiohttp_client(create_app(make_settings(dsn, pool_max_size=pool_size)))
        client.session.headers.update(bearer(await mint_token(client.app, "read-only", ["admin"])))
        created = await client.post("/v1/wallets", json={"owner": "read-only", "currency": "USD"})
        assert created.status == 201, await created.text()
        wallet_id = (await created.json())["wallet_id"]

        await admin.execute(f"alter database {name} set default_transaction_read_only = on")
        await admin.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                            "where datname = $1 and application_name = 'tally'", name)
        for attempt in range(pool_size + 2):
            await assert_unavailable(await client.post(f"/v1/wallets/{wallet_id}/credits",
                                                       json={"amount": 5, "reference": f"ro-{attempt}"}))
        ready = await client.get("/health/ready")
        await assert_unavailable(ready)
        assert "takes no writes" in (await ready.json(content_type=None))["detail"]
        read = await client.get(f"/v1/wallets/{wallet_id}")
        assert read.status == 200, await read.text()

        await admin.execute(f"alter database {name} reset default_transaction_read_only")
        answers = []
        for attempt in range(pool_size + 2):  # at most each idle read-only session fails once more
            credited = await client.post(f"/v1/wallets/{wallet_id}/credits",
                                         json={"amount": 5, "reference": f"rw-{attempt}"})
            answers.append(credited.status)
            if credited.status == 200:
                break
            await assert_unavailable(credited)
        assert answers[-1] == 200, answers
        assert (await client.get("/health/ready")).status == 200
        wallet = await client.get(f"/v1/wallets/{wallet_id}",  # the runners were restarted too: give them time
                                  headers={"X-Min-Position": credited.headers["X-Position"], "Prefer": "wait=10"})
        assert (await wallet.json())["balance"] == 5  # the refused credits changed nothing
        errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, errors
    finally:
        await admin.close()


def as_role(dsn: str, role: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, f"{role}@{parts.netloc.rpartition('@')[2]}", parts.path, parts.query, ""))


async def test_a_login_the_database_refuses_is_503_then_recovers(  # type: ignore[no-untyped-def]
    aiohttp_client, own_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stops accepting Tally's login (SQLSTATE class 28: a password rotated before the
    service's, a role that may no longer log in, a pg_hba rule) while it serves: every new session is
    refused. Commands, reads and readiness answer 503, as for any outage, not a 500 with a traceback per
    request; once the login works again, so does everything else, with no restart."""
    dsn = own_database_url
    role = f"tally_login_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"create role {role} login superuser")
    try:
        client: Client = await aiohttp_client(create_app(make_settings(as_role(dsn, role), pool_max_size=2)))
        client.session.headers.update(bearer(await mint_token(client.app, "login", ["admin"])))
        created = await client.post("/v1/wallets", json={"owner": "login", "currency": "USD"})
        assert created.status == 201, await created.text()
        wallet_id = (await created.json())["wallet_id"]

        await admin.execute(f"alter role {role} nologin")
        await admin.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = $1", role)
        for attempt in range(4):  # past the sessions it had, each attempt is a login the server refuses
            await assert_unavailable(await client.post(f"/v1/wallets/{wallet_id}/credits",
                                                       json={"amount": 5, "reference": f"refused-{attempt}"}))
            await assert_unavailable(await client.get(f"/v1/wallets/{wallet_id}"))
        ready = await client.get("/health/ready")
        await assert_unavailable(ready)
        assert "not permitted to log in" in (await ready.json(content_type=None))["detail"]

        await admin.execute(f"alter role {role} login")

        async def credited() -> bool:
            response = await client.post(f"/v1/wallets/{wallet_id}/credits", json={"amount": 5, "reference": "ok"})
            return response.status == 200

        await eventually(credited, timeout=10, what="a credit once the login works again")
        assert (await client.get("/health/ready")).status == 200
        errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, errors
        await client.close()
    finally:
        await admin.execute("select pg_terminate_backend(pid) from pg_stat_activity where usename = $1", role)
        await admin.execute(f"drop owned by {role}")
        await admin.execute(f"drop role {role}")
        await admin.close()
