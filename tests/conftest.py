"""Test database: a fresh database per session, on the embedded server or on TEST_DATABASE_URL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from backend.app import create_app
from backend.appkeys import REPOSITORY
from backend.commands.api_keys import mint
from backend.config import Settings
from backend.db import ensure_database, pool_options
from backend.store.event_store import EventStore
from backend.store.migrate import migrate
from tests.support import Client

ROOT = Path(__file__).resolve().parent.parent


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


def database_name(dsn: str) -> str:
    """The database a DSN names (the embedded server's DSNs carry a socket directory in the query)."""
    return urlsplit(dsn).path.lstrip("/")


@pytest.fixture(scope="session")
def admin_dsn() -> Iterator[str]:
    """A server to create test databases on: TEST_DATABASE_URL, else the embedded one under .data/."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        yield url
        return
    from backend.embedded_pg import start_embedded

    server = start_embedded(ROOT / ".data" / "test-pg")
    try:
        yield server.dsn("postgres")
    finally:
        server.stop()


def create_fresh_database(admin: str, *, migrated: bool = True, prefix: str = "tally_test_") -> str:
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    asyncio.run(ensure_database(admin, name))
    dsn = with_database(admin, name)
    if migrated:

        async def run() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn)
            finally:
                await conn.close()

        asyncio.run(run())
    return dsn


def drop_database(admin: str, dsn: str) -> None:
    name = database_name(dsn)

    async def run() -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def database_url(admin_dsn: str) -> Iterator[str]:
    """The session's fresh, migrated database."""
    dsn = create_fresh_database(admin_dsn)
    try:
        yield dsn
    finally:
        drop_database(admin_dsn, dsn)


@contextlib.contextmanager
def database_of_its_own(admin: str, *, migrated: bool, prefix: str = "tally_test_") -> Iterator[str]:
    dsn = create_fresh_database(admin, migrated=migrated, prefix=prefix)
    try:
        yield dsn
    finally:
        drop_database(admin, dsn)


@pytest.fixture
def fresh_database_url(admin_dsn: str) -> Iterator[str]:
    """An empty database of this test's own (not migrated)."""
    with database_of_its_own(admin_dsn, migrated=False) as dsn:
        yield dsn


@pytest.fixture
def own_database_url(admin_dsn: str) -> Iterator[str]:
    """A fresh, migrated database that only this test writes (it may tamper with it, count every row)."""
    with database_of_its_own(admin_dsn, migrated=True) as dsn:
        yield dsn


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "pool_min_size": 1,
        "pool_max_size": 10,
        "log_format": "text",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@contextlib.asynccontextmanager
async def opened_pool(dsn: str, max_size: int) -> AsyncIterator[asyncpg.Pool]:
    """A pool on `dsn`, closed on the way out (the pool fixtures share it)."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=max_size, **pool_options())
    assert pool is not None
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    async with opened_pool(database_url, 10) as pool:
        yield pool


@pytest.fixture
async def own_pool(own_database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database of this test's own (see own_database_url)."""
    async with opened_pool(own_database_url, 4) as pool:
        yield pool


@pytest.fixture
def app(settings: Settings) -> web.Application:
    return create_app(settings)


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, app: web.Application) -> Client:
    return await aiohttp_client(app)


@pytest.fixture
async def store(pool: asyncpg.Pool) -> AsyncIterator[EventStore]:
    event_store = EventStore(pool)
    try:
        yield event_store
    finally:
        await event_store.close()


async def mint_token(app: web.Application, owner: str, scopes: list[str]) -> str:
    """Create an API key straight through the repository (as `keys create` does) and return its token."""
    minted = mint(owner, f"test key of {owner}", scopes, None, datetime.now(UTC))
    await app[REPOSITORY].save(minted.key)
    return minted.token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def admin_headers(client: Client) -> dict[str, str]:
    return bearer(await mint_token(client.app, "operator", ["admin"]))
