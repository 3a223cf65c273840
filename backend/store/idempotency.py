"""Idempotency records: a command's first outcome, committed atomically with the events it appended.

Checked and inserted under the store-wide append lock (docs/ARCHITECTURE.md, "Idempotency records").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from backend.store.events import AppendResult, StoreError

LOOKUP_SQL = """
select scope, key, fingerprint, status, body, content_type, position
from idempotency_keys where (scope, key) in (select * from unnest($1::text[], $2::text[]))
"""
PURGE_SQL = "delete from idempotency_keys where created_at < now() - $1::interval"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    scope: str
    key: str
    fingerprint: bytes
    status: int
    body: bytes
    content_type: str
    position: int


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """Claim (scope, key) for this append; respond() renders the answer once positions are known."""

    scope: str
    key: str
    fingerprint: bytes
    respond: Callable[[AppendResult], tuple[int, bytes, str]]

    def record(self, result: AppendResult) -> StoredResponse:
        status, body, content_type = self.respond(result)
        position = result.position if result.streams else 0
        return StoredResponse(self.scope, self.key, self.fingerprint, status, body, content_type, position)


class IdempotencyKeyUsed(StoreError):
    """The key already has an outcome; nothing was appended."""

    def __init__(self, stored: StoredResponse) -> None:
        super().__init__(f"idempotency key {stored.key!r} was already used")
        self.stored = stored


def to_stored(row: asyncpg.Record) -> StoredResponse:
    return StoredResponse(
        row["scope"], row["key"], bytes(row["fingerprint"]), row["status"], bytes(row["body"]),
        row["content_type"], row["position"],
    )


async def lookup(db: asyncpg.Pool, scope: str, key: str) -> StoredResponse | None:
    rows = await db.fetch(LOOKUP_SQL, [scope], [key])
    return to_stored(rows[0]) if rows else None


def claim_rows(records: list[StoredResponse]) -> list[list[object]]:
    """The records as `claim_rows` of tally_insert_appended (migration 0006), a jsonb parameter."""
    return [[r.scope, r.key, r.fingerprint.hex(), r.status, r.body.hex(), r.content_type, r.position]
            for r in records]


async def purge(db: asyncpg.Pool, older_than: timedelta) -> int:
    status = await db.execute(PURGE_SQL, older_than)
    return int(status.split()[-1])
