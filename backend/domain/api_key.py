"""ApiKey: who may call the API, for which owner, with which scopes.

Only a SHA-256 hash of the secret is recorded; the command layer generates the secret
(``secrets``, prefix ``tly_``), shows it once, and passes ``hash_secret(secret)`` here.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate

from .errors import (
    InvalidTransition,
    ValidationError,
    require_text,
    require_utc,
    require_uuid,
)

ADMIN = "admin"
SCOPES: frozenset[str] = frozenset(
    {"wallets:read", "wallets:write", "deposits:write", "deposits:admin", "audit:read", ADMIN}
)

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def hash_secret(secret: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 secret (secrets are long and random: no KDF needed)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def verify_secret(secret: str, secret_hash: str) -> bool:
    """Constant-time comparison of a presented secret with a stored hash."""
    return hmac.compare_digest(hash_secret(secret), secret_hash)


def require_scopes(scopes: object) -> frozenset[str]:
    if isinstance(scopes, str) or not isinstance(scopes, Iterable):
        raise ValidationError("scopes must be a list of strings", field="scopes")
    result = frozenset(scopes)
    unknown = sorted(str(s) for s in result - SCOPES)
    if unknown:
        raise ValidationError(f"unknown scopes: {', '.join(unknown)}", field="scopes")
    if not result:
        raise ValidationError("at least one scope is required", field="scopes")
    return result


class ApiKey(Aggregate):
    class Event(Aggregate.Event):
        """Base class of every API key event."""

    class ApiKeyCreated(Event, Aggregate.Created):
        owner: str
        name: str
        scopes: tuple[str, ...]
        secret_hash: str
        expires_at: datetime | None

    class ApiKeyRevoked(Event):
        def apply(self, aggregate: ApiKey) -> None:
            aggregate.revoked_at = self.timestamp

    def __init__(
        self,
        owner: str,
        name: str,
        scopes: tuple[str, ...],
        secret_hash: str,
        expires_at: datetime | None,
    ) -> None:
        """Applies ``ApiKeyCreated``."""
        self.owner = owner
        self.name = name
        self.scopes: frozenset[str] = frozenset(scopes)
        self.secret_hash = secret_hash
        self.expires_at = expires_at
        self.revoked_at: datetime | None = None

    @classmethod
    def create(
        cls,
        key_id: UUID,
        owner: str,
        name: str,
        scopes: Iterable[str],
        secret_hash: str,
        expires_at: datetime | None,
        now: datetime,
    ) -> ApiKey:
        now = require_utc(now)
        if expires_at is not None:
            expires_at = require_utc(expires_at, "expires_at")
            if expires_at <= now:
                raise ValidationError("expires_at must be in the future", field="expires_at")
        if not isinstance(secret_hash, str) or not _SHA256_HEX.fullmatch(secret_hash):
            raise ValidationError("secret_hash must be a SHA-256 hex digest", field="secret_hash")
        return cls._create(
            cls.ApiKeyCreated,
            id=require_uuid(key_id, "key_id"),
            owner=require_text(owner, "owner", max_length=128),
            name=require_text(name, "name", max_length=128),
            scopes=tuple(sorted(require_scopes(scopes))),
            secret_hash=secret_hash,
            expires_at=expires_at,
            timestamp=now,
        )

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def revoke(self, now: datetime) -> None:
        now = require_utc(now)
        if self.revoked:
            raise InvalidTransition(f"api key {self.id} is already revoked", state="revoked", action="revoke")
        self.trigger_event(self.ApiKeyRevoked, timestamp=now)

    def allows(self, scope: str) -> bool:
        """``admin`` implies every scope."""
        return ADMIN in self.scopes or scope in self.scopes

    def can_act_for(self, owner: str) -> bool:
        """A key acts on its own owner's wallets only, unless it holds ``admin``."""
        return ADMIN in self.scopes or owner == self.owner
