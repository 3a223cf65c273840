"""Who owns a wallet stream: what the per-owner filter of keys without ``audit:read`` needs.

Only a wallet's first event (``WalletOpened``) names its owner, and an owner never changes, so a
cached answer never goes stale. Owners are learnt from the events flowing past and, for wallets
opened before them, looked up in one query per batch of events.
"""

from __future__ import annotations

from collections.abc import Sequence

from backend.store.events import RecordedEvent
from backend.store.reads import Executor

WALLET_PREFIX = "wallet-"
OPENED = "WalletOpened"

OWNERS_SQL = """
select stream_id, data->>'owner' as owner from events
where stream_id = any($1::text[]) and version = 1 and type = 'WalletOpened'
"""


def opened_owner(event: RecordedEvent) -> str | None:
    if event.type == OPENED and event.version == 1 and event.stream_id.startswith(WALLET_PREFIX):
        owner = event.data.get("owner")
        return owner if isinstance(owner, str) else None
    return None


class Owners:
    def __init__(self, db: Executor, max_entries: int = 200_000) -> None:
        self._db = db
        self._max_entries = max_entries
        self._owners: dict[str, str | None] = {}
        """None remembers a stream with events but no WalletOpened: no owner, ever."""

    def get(self, stream_id: str) -> str | None:
        return self._owners.get(stream_id)

    async def owner_of(self, stream_id: str) -> str | None:
        """The owner of a wallet stream; None for any other stream or a wallet that does not exist."""
        if stream_id not in self._owners and stream_id.startswith(WALLET_PREFIX):
            found = await self._fetch([stream_id])
            if stream_id in found:
                self._remember(stream_id, found[stream_id])
        return self._owners.get(stream_id)

    async def resolve(self, events: Sequence[RecordedEvent]) -> None:
        """Make ``get`` answer for the wallet streams of these events."""
        for event in events:
            owner = opened_owner(event)
            if owner is not None:
                self._remember(event.stream_id, owner)
        missing = {e.stream_id for e in events if e.stream_id.startswith(WALLET_PREFIX)} - self._owners.keys()
        if missing:
            found = await self._fetch(list(missing))
            for stream_id in missing:  # the stream has events, so its first one is visible too
                self._remember(stream_id, found.get(stream_id))

    async def _fetch(self, stream_ids: list[str]) -> dict[str, str]:
        return {row["stream_id"]: row["owner"] for row in await self._db.fetch(OWNERS_SQL, stream_ids)}

    def _remember(self, stream_id: str, owner: str | None) -> None:
        if len(self._owners) >= self._max_entries:
            for stale in list(self._owners)[: self._max_entries // 2]:  # the oldest half
                del self._owners[stale]
        self._owners[stream_id] = owner
