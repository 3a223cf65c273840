"""API keys: minting (the secret is shown once, only its hash is stored), lookup, revocation, listing."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from backend.commands.bus import Decision
from backend.commands.context import CommandContext
from backend.commands.errors import NotFound, PreconditionFailed, check_if_match
from backend.domain import ApiKey, hash_secret
from backend.store.repository import Repository

TOKEN_PREFIX = "tly_"  # noqa: S105 (a prefix that makes leaked keys recognisable, not a secret)
_TOKEN = re.compile(r"^tly_([0-9a-f]{32})_([A-Za-z0-9_-]{32,128})$")


@dataclass(frozen=True, slots=True)
class MintedKey:
    key: ApiKey
    token: str
    """tly_<key id hex>_<secret>: give it to the client once; Tally keeps only its SHA-256."""


def new_token() -> tuple[UUID, str]:
    """A fresh key id and the token naming it, before any key exists (a command may be retried)."""
    key_id = uuid4()
    return key_id, f"{TOKEN_PREFIX}{key_id.hex}_{secrets.token_urlsafe(32)}"


def mint(owner: str, name: str, scopes: Sequence[str], expires_at: datetime | None, now: datetime) -> MintedKey:
    key_id, token = new_token()
    key = ApiKey.create(key_id, owner, name, scopes, hash_secret(token), expires_at, now)
    return MintedKey(key, token)


def parse_token(token: str) -> UUID | None:
    """The key id a well-formed token names, else None (then there is nothing to look up)."""
    match = _TOKEN.match(token)
    return UUID(hex=match[1]) if match else None


def key_body(key: ApiKey) -> dict[str, Any]:
    """What a client may see of a key: never the secret, never its hash."""
    return {
        "key_id": str(key.id),
        "owner": key.owner,
        "name": key.name,
        "scopes": sorted(key.scopes),
        "created_at": key.created_on.isoformat(),
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "revoked": key.revoked,
        "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
        "version": key.version,
    }


async def create_key(
    repo: Repository, ctx: CommandContext, key_id: UUID, token: str, owner: str, name: str,
    scopes: Sequence[str], expires_at: datetime | None,
) -> Decision:
    """Record a key for a token made by new_token(); the answer leaves the token out (the caller
    adds it to the first response only, so it is never stored, not even for Idempotency-Key replays)."""
    if await repo.find(ApiKey, key_id) is not None:
        raise PreconditionFailed(f"api key {key_id} already exists")
    key = ApiKey.create(key_id, owner, name, scopes, hash_secret(token), expires_at, ctx.now)
    return Decision([key], key_body(key))


async def revoke_key(
    repo: Repository, ctx: CommandContext, key_id: UUID, expected_version: int | None = None
) -> Decision:
    key = await repo.find(ApiKey, key_id)
    if key is None:
        raise NotFound(f"api key {key_id} does not exist")
    check_if_match(f"api key {key_id}", key.version, expected_version)
    key.revoke(ctx.now)  # InvalidTransition when already revoked
    return Decision([key], key_body(key))
