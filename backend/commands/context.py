"""Who issues a command, when, and under which request: the metadata every event carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Actor:
    """The authenticated caller: an API key acting for its owner."""

    key_id: str
    owner: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def can_act_for(self, owner: str) -> bool:
        return "admin" in self.scopes or owner == self.owner


SYSTEM = Actor(key_id="system", owner="system", scopes=frozenset({"admin"}))
"""Commands Tally issues itself (reservation expiry, bootstrap)."""


@dataclass(frozen=True, slots=True)
class CommandContext:
    actor: Actor
    request_id: str | None = None
    correlation_id: str | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"actor": self.actor.key_id}
        if self.request_id:
            meta["request_id"] = self.request_id
        correlation_id = self.correlation_id or self.request_id
        if correlation_id is not None:
            meta["correlation_id"] = correlation_id
        return meta

    def at(self, now: datetime) -> CommandContext:
        """This context at another time (itself at its own: a first attempt builds nothing)."""
        if now is self.now:
            return self
        return CommandContext(self.actor, self.request_id, self.correlation_id, now)
