"""API keys: minting (the secret is shown once, only its hash is stored), lookup and revocation."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID, uuid4

from backend.domain import ApiKey, hash_secret
from backend.domain.api_key import verify_secret

TOKEN_PREFIX = "tly_"  # noqa: S105 (a prefix that makes leaked keys recognisable, not a secret)
_TOKEN = re.compile(r"^tly_([0-9a-f]{32})_([A-Za-z0-9_-]{32,128})$")


@dataclass(frozen=True, slots=True)
class MintedKey:
    key: ApiKey
    token: str
    """tly_<key id hex>_<secret>: give it to the client once; Tally keeps only its SHA-256."""


def mint(owner: str, name: str, scopes: list[str], expires_at: datetime | None, now: datetime) -> MintedKey:
    key_id = uuid4()
    token = f"{TOKEN_PREFIX}{key_id.hex}_{secrets.token_urlsafe(32)}"
    key = ApiKey.create(key_id, owner, name, scopes, hash_secret(token), expires_at, now)
    return MintedKey(key, token)


def parse_token(token: str) -> UUID | None:
    """The key id a well-formed token names, else None (then there is nothing to look up)."""
    match = _TOKEN.match(token)
    return UUID(hex=match[1]) if match else None


def token_matches(key: ApiKey, token: str) -> bool:
    return verify_secret(token, key.secret_hash)
