"""Idempotency records: a command's first outcome, committed atomically with the events it appended.

The outcome is opaque to the store: bytes its caller encoded before the append (the command bus's
neutral outcome, backend/commands/outcome.py), to which the store adds only the position it assigned.
Checked and inserted under the store-wide append lock (docs/ARCHITECTURE.md, "Idempotency records"),
where nothing is rendered or encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from backend.store.events import AppendResult, StoreError

LOOKUP_SQL = """
select scope, key, fingerprint, outcome, position
from idempotency_keys where (scope, key) in (select * from unnest($1::text[], $2::text[]))
"""
PURGE_SQL = "delete from idempotency_keys where created_at < now() - $1::interval"


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    scope: str
    key: str
    fingerprint: bytes
    outcome: bytes
    position: int
    """The last position the first request appended, 0 if it appended nothing."""


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """Claim (scope, key) for this append, with the outcome to keep if the append commits."""

    scope: str
    key: str
    fingerprint: bytes
    outcome: bytes

    def record(self, result: AppendResult) -> StoredOutcome:
        position = result.position if result.streams else 0
        return StoredOutcome(self.scope, self.key, self.fingerprint, self.outcome, position)


class IdempotencyKeyUsed(StoreError):
    """The key already has an outcome; nothing was appended."""

    def __init__(self, stored: StoredOutcome) -> None:
        super().__init__(f"idempotency key {stored.key!r} was already used")
        self.stored = stored


def to_stored(row: asyncpg.Record) -> StoredOutcome:
    return StoredOutcome(row["scope"], row["key"], bytes(row["fingerprint"]), bytes(row["outcome"]), row["position"])


async def lookup(db: asyncpg.Pool, scope: str, key: str) -> StoredOutcome | None:
    rows = await db.fetch(LOOKUP_SQL, [scope], [key])
    return to_stored(rows[0]) if rows else None


def claim_rows(records: list[StoredOutcome]) -> list[list[object]]:
    """The records as `claim_rows` of tally_insert_appended (layout in migration 0008), a jsonb parameter."""
    return [[r.scope, r.key, r.fingerprint.hex(), r.outcome.hex(), r.position] for r in records]


async def purge(db: asyncpg.Pool, older_than: timedelta) -> int:
    status = await db.execute(PURGE_SQL, older_than)
    return int(status.split()[-1])
