"""Versioned SQL migrations, applied in order, each in its own transaction, once across processes.

Files are `migrations/NNNN_name.sql`. A session advisory lock serialises concurrent starters: the
second waits, then finds every version already recorded in `schema_migrations` and applies nothing.
A recorded migration whose file has since changed is an error, not a silent skip. On an up-to-date
schema it only reads, so a role that may not create tables (the app role of `db roles`) passes it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

from backend.db import Connection

log = logging.getLogger(__name__)

MIGRATION_LOCK_KEY = 0x7A11_0001  # advisory lock id reserved for migrations
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = """
create table if not exists schema_migrations (
    version    int primary key,
    name       text not null,
    checksum   text not null,
    applied_at timestamptz not null default now()
)
"""


class MigrationError(Exception):
    pass


class NotMigrated(MigrationError):
    """The database lacks migrations this code needs; read-only commands say so instead of migrating."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def available_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("backend.store").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions: {versions}")
    return found


async def migrate(conn: Connection) -> list[int]:
    """Apply every pending migration; return the versions this call applied."""
    applied_now: list[int] = []
    await conn.execute("select pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        if await conn.fetchval("select to_regclass('schema_migrations')") is None:
            await conn.execute(_CREATE_TABLE)  # only then: a role without CREATE may check an up-to-date schema
        rows = await conn.fetch("select version, checksum from schema_migrations")
        recorded = {row["version"]: row["checksum"] for row in rows}
        for migration in available_migrations():
            if migration.version in recorded:
                if recorded[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} changed after it was applied"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "insert into schema_migrations (version, name, checksum) values ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            log.info("migration applied", extra={"version": migration.version, "migration": migration.name})
            applied_now.append(migration.version)
    finally:
        await conn.execute("select pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now


@dataclass(frozen=True)
class MigrationStatus:
    """What `migrate --status` shows: read without the lock and without creating anything."""

    applied: list[tuple[int, str]]
    pending: list[Migration]
    changed: list[Migration]  # applied, but the file's checksum differs from the recorded one
    unknown: list[tuple[int, str]]  # recorded by a newer version of Tally: no file here

    @property
    def up_to_date(self) -> bool:
        return not (self.pending or self.changed)


async def migration_status(conn: Connection) -> MigrationStatus:
    exists = await conn.fetchval("select to_regclass('schema_migrations') is not null")
    rows = await conn.fetch("select version, name, checksum from schema_migrations order by version") if exists else []
    recorded = {row["version"]: (row["name"], row["checksum"]) for row in rows}
    files = available_migrations()
    known = {m.version for m in files}
    return MigrationStatus(
        applied=[(version, name) for version, (name, _) in recorded.items() if version in known],
        pending=[m for m in files if m.version not in recorded],
        changed=[m for m in files if m.version in recorded and recorded[m.version][1] != m.checksum],
        unknown=[(version, name) for version, (name, _) in recorded.items() if version not in known],
    )


async def require_migrated(conn: Connection, where: str) -> None:
    """Raise NotMigrated, naming the missing migrations, unless every migration here is applied."""
    found = await migration_status(conn)
    if found.pending:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in found.pending)
        raise NotMigrated(f"database {where} is not migrated ({len(found.pending)} pending: {names}); "
                          "run `python -m backend migrate` first")
