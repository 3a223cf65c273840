"""Resolve a Bearer token to an Actor through the ApiKey aggregate (cached per process)."""

from __future__ import annotations

from datetime import UTC, datetime

from backend.commands.api_keys import parse_token, token_matches
from backend.commands.context import Actor
from backend.domain import ApiKey
from backend.store.repository import Repository


class ApiKeyAuthenticator:
    def __init__(self, repository: Repository) -> None:
        self.repository = repository

    async def authenticate(self, token: str) -> Actor | None:
        key_id = parse_token(token)
        if key_id is None:
            return None
        key = await self.repository.find(ApiKey, key_id)
        if key is None or not token_matches(key, token) or not key.is_active(datetime.now(UTC)):
            return None
        return Actor(key_id=str(key.id), owner=key.owner, scopes=frozenset(key.scopes))
