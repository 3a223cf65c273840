"""The asyncpg pool: creation with codecs and timeouts, fail-fast or wait-with-backoff, DSN masking."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from backend import service_manager
from backend.config import Settings

log = logging.getLogger(__name__)

UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # the socket: refused, reset, unreachable (TimeoutError is one too)
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08, and asyncpg's ConnectionDoesNotExistError
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # class 28: the server refuses the login (a
    #  password rotated there first, a role that may no longer log in, a pg_hba rule): no new session
    asyncpg.exceptions.OperatorInterventionError,  # class 57: admin or crash shutdown, cannot connect
    #  now, statement_timeout (QueryCanceledError), idle session timeout, database dropped
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full, out of memory
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # 25006: the server takes no writes now (a hot standby
    #  reached before a failover completes, default_transaction_read_only set for maintenance)
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,  # 25P03: the server's idle-in-transaction timeout
    asyncpg.exceptions.LockNotAvailableError,  # 55P03: a lock_timeout set on the role or database expired
    asyncpg.exceptions.TransactionRollbackError,  # class 40: a deadlock or serialization failure the server
    #  resolved by rolling this transaction back (nothing of it committed), or a commit of unknown outcome
    asyncpg.exceptions.PostgresSystemError,  # class 58: the server's own I/O failed
    asyncpg.exceptions.InternalServerError,  # class XX: the server's internal error, corrupted data or index
)
"""Errors that mean "the database cannot do this right now", whatever the request: a bug or bad SQL is
none of these (UndefinedTableError is class 42, asyncpg's DataError an InterfaceError). Catch with
is_unavailable, which also recognises the two asyncpg client errors below by their message."""

_CLOSED_MESSAGES = ("pool is closing", "pool is closed", "connection is closed",
                    "another operation is cancelling", "connection has been released back to the pool")
"""asyncpg.InterfaceError is "improper use of the API": mostly a bug (wrong argument count, an
unsupported codec, a connection used by two tasks at once), so only these messages, which come from a
pool being closed at shutdown or a connection lost under an operation, mean unavailable. The last is
what a borrowed connection says once the server dropped it between two queries (a termination, a
restart): asyncpg hands it back to the pool at once, so the next query on it (the next page of an
export, of a stream's catch-up) fails with it."""

_PROTOCOL_STATE_MESSAGES = ("cannot switch to", "not connected", "cannot process message",
                            "unknown error in protocol implementation")
"""asyncpg.InternalClientError from the protocol's state machine. After a server restart a connection
whose socket died under an operation is left in a state the next operation cannot leave ("cannot
switch to state 12; another operation (2) is in progress"): the connection is broken, not the query,
and the pool replaces it. Other InternalClientErrors (a codec without an encoder, a schema cache gone
stale: OutdatedSchemaCacheError) point at our code or schema and stay 500s."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether exc means the database (or our connection to it) is down: answer 503, retry later."""
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return True
    message = str(exc)
    if isinstance(exc, asyncpg.exceptions.DataError | asyncpg.exceptions.ClientConfigurationError):
        return False
    if isinstance(exc, asyncpg.InterfaceError):
        return any(closed in message for closed in _CLOSED_MESSAGES)
    if isinstance(exc, asyncpg.exceptions.ProtocolError):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError) and not isinstance(
            exc, asyncpg.exceptions.OutdatedSchemaCacheError):
        return message.startswith(_PROTOCOL_STATE_MESSAGES)
    return False


# At startup a database that does not exist (yet) is as unreachable as a server that is down.
_STARTUP_ERRORS: tuple[type[BaseException], ...] = (*UNAVAILABLE_ERRORS, asyncpg.InvalidCatalogNameError)

Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
"""A plain connection or one borrowed from the pool; store and migration code accepts both."""


class DatabaseUnavailable(Exception):
    """Startup could not reach the database; the message is one line with the password masked."""


def mask_dsn(dsn: str) -> str:
    """Hide the password of a DSN, whether in the userinfo or in a password= query parameter (its name
    percent-encoded or not). A DSN that does not parse is hidden whole."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "(a malformed URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostinfo}"
    query = "&".join(_masked_parameter(item) for item in parts.query.split("&"))
    fragment = "#***" if parts.fragment else ""
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "") + fragment


def _masked_parameter(item: str) -> str:
    name, equals, _ = item.partition("=")
    return f"{name}=***" if equals and unquote(name).lower() == "password" else item


async def init_connection(conn: Connection) -> None:
    """jsonb and json travel as orjson-encoded text, decoded to Python objects."""
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(
            typename,
            encoder=lambda value: orjson.dumps(value).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "command_timeout": settings.command_timeout_s,
        "timeout": settings.connect_timeout_s,
        "server_settings": {
            "application_name": "tally",
            "statement_timeout": str(settings.statement_timeout_ms),
        },
    }


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release: nothing beyond what asyncpg always does (roll back an open transaction),
    except that a session the server has made read-only is closed, so that the next acquire connects
    anew: once the database takes writes again, or the address leads to the new primary of a failover,
    the pool has no read-only session left to fail a command.

    asyncpg's default reset costs a round trip on every release (`select pg_advisory_unlock_all();
    close all; unlisten *; reset all`), and Tally leaves none of that on pooled connections: advisory
    locks are transaction-scoped (the migration lock is released in a finally), cursors live inside
    transactions, LISTEN and session settings are only used on connections of their own (which go to
    DIRECT_DATABASE_URL, so that the pools also work through PgBouncer in transaction mode)."""
    if refuses_writes(conn):
        conn.terminate()


async def keep_replica_session(conn: asyncpg.Connection) -> None:
    """keep_session for a replica's pool, whose sessions are read-only by design."""


def refuses_writes(conn: asyncpg.Connection) -> bool:
    """Whether the server has said this session cannot write: a hot standby, or
    default_transaction_read_only on. PostgreSQL 14 and later report both to the client as they change
    (no round trip); a pooler in between may not pass them on."""
    reported = conn.get_settings()
    return "on" in (getattr(reported, "in_hot_standby", "off"),
                    getattr(reported, "default_transaction_read_only", "off"))


def pooled_connect_kwargs(settings: Settings) -> dict[str, Any]:
    """connect_kwargs for the pools on DATABASE_URL. In DATABASE_POOL_MODE=transaction a pooler such as
    PgBouncer hands each transaction any server connection: asyncpg's named prepared statements would
    not be there (PgBouncer before 1.21 does not follow them; asyncpg then re-parses an unnamed
    statement in the same exchange as its execution), and PgBouncer refuses statement_timeout as a
    startup parameter, so that one is left to the role or the pooler (docs/DEPLOYMENT.md)."""
    kwargs = connect_kwargs(settings)
    if settings.database_pool_mode == "transaction":
        kwargs["statement_cache_size"] = 0
        kwargs["server_settings"] = {"application_name": "tally"}
    return kwargs


async def warn_without_statement_timeout(pool: asyncpg.Pool, settings: Settings) -> None:
    """In DATABASE_POOL_MODE=transaction STATEMENT_TIMEOUT_MS is not sent at connect: say so once at
    startup when the server's own setting (the role's or the database's) leaves the pools without one."""
    if settings.database_pool_mode != "transaction" or not settings.statement_timeout_ms:
        return
    if await pool.fetchval("select current_setting('statement_timeout')") == "0":
        log.warning("no statement_timeout on the pooled connections: with DATABASE_POOL_MODE=transaction "
                    "STATEMENT_TIMEOUT_MS cannot be sent through the pooler; set it on the role "
                    "(ALTER ROLE ... SET statement_timeout)",
                    extra={"statement_timeout_ms": settings.statement_timeout_ms})


def pool_options(*, replica: bool = False) -> dict[str, Any]:
    """What every Tally pool is opened with."""
    return {"init": init_connection, "reset": keep_replica_session if replica else keep_session}


TAKES_NO_WRITES = ("takes no writes (transaction_read_only is on: a hot standby, or "
                   "default_transaction_read_only)")


async def read_only(db: asyncpg.Pool | Connection) -> bool:
    """Whether the database's sessions are read-only, asked of the server (a round trip; refuses_writes
    reads what the server last reported, for free)."""
    return bool(await db.fetchval("select current_setting('transaction_read_only') = 'on'"))


class TakesNoWrites(Exception):
    """The database answers, but its sessions are read-only."""

    def __str__(self) -> str:
        return f"it {TAKES_NO_WRITES}; DATABASE_URL must lead to the primary"


_POOL_RETRIES: tuple[type[BaseException], ...] = (*_STARTUP_ERRORS, TakesNoWrites)
"""What create_pool waits out, for up to WAIT_FOR_DB."""


async def create_pool(dsn: str, settings: Settings, *, writable: bool = True) -> asyncpg.Pool:
    """Open a pool on DATABASE_URL (which may be PgBouncer, see pooled_connect_kwargs); retry with backoff
    for up to WAIT_FOR_DB seconds, else fail at once. With writable, the database must also take writes:
    during a failover the address may still lead to a standby."""
    deadline = time.monotonic() + settings.wait_for_db_s
    delay = 0.2
    while True:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=settings.pool_min_size,
                max_size=settings.pool_max_size,
                **pool_options(),
                **pooled_connect_kwargs(settings),
            )
            assert pool is not None
            if writable:
                await _require_writes(pool)
            return pool
        except _POOL_RETRIES as exc:
            unwritable = isinstance(exc, TakesNoWrites)
            reason = str(exc) if unwritable else describe(exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                verb = "cannot use" if unwritable else "cannot connect to"
                raise DatabaseUnavailable(f"{verb} database {mask_dsn(dsn)}: {reason}") from None
            log.warning("database takes no writes, retrying" if unwritable else "database not reachable, retrying",
                        extra={"reason": reason, "retry_in_s": round(delay, 2)})
            service_manager.status(f"waiting for the database: {reason}")
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 5.0)


async def _require_writes(pool: asyncpg.Pool) -> None:
    """Raise TakesNoWrites (closing the pool) when the database's sessions are read-only."""
    try:
        if await read_only(pool):
            raise TakesNoWrites
    except BaseException:
        await pool.close()
        raise


@contextlib.asynccontextmanager
async def direct_connection(dsn: str, settings: Settings) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A connection of its own, set up like the pool's, for what needs a session (the migration lock):
    dsn is DIRECT_DATABASE_URL's (Settings.direct_dsn), never a pooler in transaction mode."""
    try:
        conn: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(dsn, **connect_kwargs(settings))
    except _STARTUP_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot connect to database {mask_dsn(dsn)}: {describe(exc)}") from None
    try:
        await init_connection(conn)
        yield conn
    finally:
        await conn.close()


class OtherDatabase(DatabaseUnavailable):
    """DIRECT_DATABASE_URL leads to another database than DATABASE_URL."""


SAME_DATABASE_SQL = "select pg_postmaster_start_time(), oid from pg_database where datname = current_database()"
"""What tells one database from another, also through a pooler whose database names are aliases: the
server's start time (another server, a standby of this one) and the database's oid (another database
on this server)."""


async def require_same_database(pool: asyncpg.Pool, dsn: str, direct_dsn: str, settings: Settings) -> None:
    """Raise OtherDatabase (one line) unless DIRECT_DATABASE_URL reaches the pool's database: otherwise the
    migrations, the leaders and LISTEN would work on the one while commands append to the other, and the
    read models would never see an event."""
    pooled = tuple(await pool.fetchrow(SAME_DATABASE_SQL) or ())
    async with direct_connection(direct_dsn, settings) as conn:
        direct = tuple(await conn.fetchrow(SAME_DATABASE_SQL) or ())
    if pooled != direct:
        raise OtherDatabase(f"DIRECT_DATABASE_URL {mask_dsn(direct_dsn)} leads to another database than "
                            f"DATABASE_URL {mask_dsn(dsn)}: it must reach the same database, bypassing the pooler")


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def ensure_database(admin_dsn: str, name: str) -> None:
    """Create database `name` on the server behind admin_dsn unless it exists (embedded server, tests)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain database name: {name!r}")
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("select 1 from pg_database where datname = $1", name)
        if not exists:
            # another process may create it between our check and our create
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'create database "{name}"')
    finally:
        await conn.close()
