"""database_dsn(settings): where the database is, beside backend/db.py so that every entry point (serve,
the projection worker, the command lines) can reach it without importing the web application."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from backend.config import Settings
from backend.db import ensure_database

EMBEDDED_DATABASE = "tally"


@contextlib.asynccontextmanager
async def database_dsn(settings: Settings) -> AsyncIterator[str]:
    """Yield DATABASE_URL, or start the embedded PostgreSQL under DATA_DIR/pg when it is unset."""
    dsn = settings.dsn()
    if dsn is not None:
        yield dsn
        return
    from backend.embedded_pg import start_embedded

    server = await asyncio.to_thread(start_embedded, settings.data_dir / "pg")
    try:
        await ensure_database(server.dsn("postgres"), EMBEDDED_DATABASE)
        yield server.dsn(EMBEDDED_DATABASE)
    finally:
        await asyncio.to_thread(server.stop)
