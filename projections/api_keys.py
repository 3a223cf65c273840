"""Read model "api_keys": one row per key, for key listings (GET /v1/api-keys). Authentication does
not read it: it loads the ApiKey aggregate (backend.http.authenticator), current to the last event.

Times are the domain's own (occurred_at), so a key reads the same here as from its aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from backend.db import Connection
from backend.store.reads import Executor
from projections.base import APIKEY, MalformedEvent, Projection, Rows, aggregate_id, expect_count
from projections.checkpoints import with_checkpoint
from projections.events import Event

CREATED = Rows(id="uuid", o="text", n="text", s="text", h="text", e="timestamptz", t="timestamptz", v="int")
INSERT_SQL = f"""
insert into api_keys (key_id, owner, name, scopes, secret_hash, expires_at, created_at, version)
select x.id, x.o, x.n, string_to_array(x.s, ' '), x.h, x.e, x.t, x.v
from {CREATED.source("$1")} as x
"""
REVOKED = Rows(id="uuid", t="timestamptz", v="int")
REVOKE_SQL = f"""
update api_keys k set revoked = true, revoked_at = x.t, version = x.v
from {REVOKED.source("$1")} as x
where k.key_id = x.id and not k.revoked
"""


class ApiKeys(Projection):
    name = "api_keys"
    types = frozenset({"ApiKeyCreated", "ApiKeyRevoked"})
    tables = ("api_keys",)

    async def apply(self, conn: Connection, events: Sequence[Event]) -> None:
        created: list[tuple[Any, ...]] = []
        revoked: dict[str, tuple[str, int]] = {}
        for event in events:
            data = event.data
            key_id = aggregate_id(event, APIKEY)
            if event.type == "ApiKeyCreated":
                created.append((key_id, data["owner"], data["name"], _scopes(data),
                                data["secret_hash"], data.get("expires_at"), data["occurred_at"],
                                event.version))
            else:
                revoked[key_id] = (data["occurred_at"], event.version)
        if created:
            await conn.execute(INSERT_SQL, CREATED.of(created))
        if revoked:
            status = await conn.execute(REVOKE_SQL, REVOKED.of((k, *row) for k, row in revoked.items()))
            expect_count(status, len(revoked), "a key revoked that does not exist or is already revoked")


def _scopes(data: dict[str, Any]) -> str:
    """Scopes as one space-separated string (a row's values are scalars; SQL splits it again)."""
    scopes = data["scopes"]
    if not isinstance(scopes, list) or not all(type(s) is str and s and " " not in s for s in scopes):
        raise MalformedEvent("scopes must be a list of scope names")
    return " ".join(scopes)


# ---------------------------------------------------------------- queries

# A page of the listing in (created_at, key_id) order after a key (keys are never deleted, so the
# cursor's row is always there), with the checkpoint it reflects read in the same statement.
_LISTED = "key_id, owner, name, scopes, expires_at, revoked, revoked_at, created_at, version"
_AFTER = "($2::uuid is null or (created_at, key_id) > (select created_at, key_id from api_keys where key_id = $2))"
LIST_BY_OWNER_SQL = with_checkpoint("api_keys", f"""
select {_LISTED} from api_keys where owner = $1 and {_AFTER} order by created_at, key_id limit $3""")
LIST_ALL_SQL = with_checkpoint("api_keys", f"""
select {_LISTED} from api_keys where $1::text is null and {_AFTER} order by created_at, key_id limit $3""")
GET_SQL = with_checkpoint("api_keys", f"select {_LISTED} from api_keys where key_id = $1")


def key_view(row: Any) -> dict[str, Any]:
    """A key as clients may see it: never the secret, never its hash."""
    return {
        "key_id": str(row["key_id"]),
        "owner": row["owner"],
        "name": row["name"],
        "scopes": sorted(row["scopes"]),
        "created_at": row["created_at"].isoformat(),
        "expires_at": row["expires_at"].isoformat() if row["expires_at"] else None,
        "revoked": row["revoked"],
        "revoked_at": row["revoked_at"].isoformat() if row["revoked_at"] else None,
        "version": row["version"],
    }


async def list_keys(db: Executor, owner: str | None = None, after: UUID | None = None, limit: int = 2**31 - 1
                    ) -> tuple[int, list[dict[str, Any]]]:
    """(checkpoint, up to limit keys of one owner or of all after the key `after`, oldest first)."""
    rows = await db.fetch(LIST_ALL_SQL if owner is None else LIST_BY_OWNER_SQL, owner, after, limit)
    checkpoint = rows[0]["checkpoint"] if rows else 0
    return checkpoint, [key_view(row) for row in rows if row["key_id"] is not None]


async def get_key(db: Executor, key_id: UUID) -> tuple[int, dict[str, Any] | None]:
    """(checkpoint, the key as clients may see it, or None)."""
    row = await db.fetchrow(GET_SQL, key_id)
    checkpoint = row["checkpoint"] if row is not None else 0
    return checkpoint, key_view(row) if row is not None and row["key_id"] is not None else None
