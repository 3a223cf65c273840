"""Resolve a Bearer token to an Actor, from an in-process cache of keys so that authenticating
a request costs no database round trip once its key has been seen.

The cache holds, per key id, the key's SHA-256 secret hash, its Actor and its expiry; a presented
secret is checked against the cached hash in constant time, and a token that passed is remembered with
the entry it passed against, so its next request skips parsing and hashing for as long as that very
entry stays in the cache (a revocation or a reload replaces it). The expiry is checked every time.
Unknown key ids are remembered only briefly (a negative TTL), so a key created a moment later by
another process is found.

Revocation reaches every process within a second: a background task tails the event log for
`ApiKeyRevoked` (from the head at startup), woken by the Listener and polling as a fallback, and
replaces the key's entry with a tombstone. A tombstone also wins over a concurrent cache fill that
read the key before it was revoked, so a stale "active" copy can never be installed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from backend.commands.api_keys import parse_token
from backend.commands.context import Actor
from backend.db import UNAVAILABLE_ERRORS, describe
from backend.domain import ApiKey, parse_stream_id, verify_secret
from backend.store.listener import Listener
from backend.store.repository import Repository

log = logging.getLogger(__name__)

REVOKED_EVENT = "ApiKeyRevoked"


@dataclass(frozen=True, slots=True)
class KnownKey:
    actor: Actor
    secret_hash: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class Revoked:
    """Tombstone: revocation is final, so it is safe to remember for as long as there is room."""


@dataclass(frozen=True, slots=True)
class Unknown:
    until: float
    """time.monotonic() after which the database is asked again."""


Entry = KnownKey | Revoked | Unknown
REVOKED = Revoked()


class ApiKeyAuthenticator:
    def __init__(
        self,
        repository: Repository,
        listener: Listener | None = None,
        *,
        max_entries: int = 10_000,
        negative_ttl_s: float = 2.0,
        poll_interval_s: float = 0.5,
        min_interval_s: float = 0.05,
        page_size: int = 1000,
    ) -> None:
        self.repository = repository
        self.listener = listener
        self.max_entries = max_entries
        self.negative_ttl_s = negative_ttl_s
        self.poll_interval_s = poll_interval_s
        self.min_interval_s = min_interval_s
        """Floor between two log scans: under write load the Listener wakes on every append."""
        self.page_size = page_size
        self.checkpoint = 0
        """Position up to which ApiKeyRevoked events have been applied."""
        self.loads = 0
        """Database lookups made (tests and metrics)."""
        self._cache: OrderedDict[UUID, Entry] = OrderedDict()
        self._verified: dict[str, tuple[UUID, KnownKey]] = {}
        """Token -> (key id, the cache entry it was verified against)."""
        self._loading: dict[UUID, asyncio.Task[Entry]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Tail revocations from the current head (older ones are visible to any later load)."""
        self.checkpoint = await self.repository.store.head()
        self._task = asyncio.create_task(self._watch(), name="api-key-revocations")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._loading.values()):
            task.cancel()

    # ---------------------------------------------------------------- requests

    async def authenticate(self, token: str) -> Actor | None:
        verified = self._verified.get(token)
        if verified is not None and self._cache.get(verified[0]) is verified[1]:
            self._cache.move_to_end(verified[0])
            return self._unexpired(verified[1])
        key_id = parse_token(token)
        if key_id is None:
            return None
        entry = self._cached(key_id)
        if entry is None:
            entry = await self._load_once(key_id)
        if not isinstance(entry, KnownKey) or not verify_secret(token, entry.secret_hash):
            return None
        if len(self._verified) >= self.max_entries:
            self._verified.clear()
        self._verified[token] = (key_id, entry)
        return self._unexpired(entry)

    async def actor_of(self, key_id: UUID) -> Actor | None:
        """The key's Actor while it is neither revoked nor expired (a stream token's key, checked when
        a stream opens with it)."""
        entry = self._cached(key_id)
        if entry is None:
            entry = await self._load_once(key_id)
        return self._unexpired(entry) if isinstance(entry, KnownKey) else None

    @staticmethod
    def _unexpired(entry: KnownKey) -> Actor | None:
        if entry.expires_at is not None and datetime.now(UTC) >= entry.expires_at:
            return None
        return entry.actor

    def mark_revoked(self, key_id: UUID) -> None:
        """Mark a key revoked in this process at once (the tailer does it for every other one)."""
        self._put(key_id, REVOKED)

    # ---------------------------------------------------------------- cache

    def _cached(self, key_id: UUID) -> Entry | None:
        entry = self._cache.get(key_id)
        if entry is None:
            return None
        if isinstance(entry, Unknown) and entry.until <= time.monotonic():
            del self._cache[key_id]
            return None
        self._cache.move_to_end(key_id)
        return entry

    def _put(self, key_id: UUID, entry: Entry) -> None:
        self._cache[key_id] = entry
        self._cache.move_to_end(key_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    async def _load_once(self, key_id: UUID) -> Entry:
        """One database lookup per key id however many requests miss the cache together."""
        task = self._loading.get(key_id)
        if task is None:
            task = asyncio.create_task(self._load(key_id))
            self._loading[key_id] = task
            task.add_done_callback(functools.partial(self._loaded, key_id))
        return await asyncio.shield(task)

    def _loaded(self, key_id: UUID, task: asyncio.Task[Entry]) -> None:
        if self._loading.get(key_id) is task:
            del self._loading[key_id]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter was cancelled

    async def _load(self, key_id: UUID) -> Entry:
        self.loads += 1
        key = await self.repository.find(ApiKey, key_id)
        entry: Entry
        if key is None:
            entry = Unknown(time.monotonic() + self.negative_ttl_s)
        elif key.revoked or isinstance(self._cache.get(key_id), Revoked):
            entry = REVOKED  # a tombstone that arrived while we were reading wins
        else:
            actor = Actor(key_id=str(key.id), owner=key.owner, scopes=frozenset(key.scopes))
            entry = KnownKey(actor, key.secret_hash, key.expires_at)
        self._put(key_id, entry)
        return entry

    # ---------------------------------------------------------------- revocations

    async def _watch(self) -> None:
        while True:
            seen_head = self.listener.head if self.listener is not None else 0
            started = time.monotonic()
            failing = self._failing
            self._failing = True
            try:
                await self.catch_up()
                self._failing = False
            except UNAVAILABLE_ERRORS as exc:
                if not failing:  # once per outage, not every poll
                    log.warning("cannot read API key revocations, retrying", extra={"reason": describe(exc)})
            except Exception:
                log.exception("reading API key revocations failed, retrying")
            if failing and not self._failing:
                log.info("reading API key revocations again", extra={"checkpoint": self.checkpoint})
            if self.listener is None:
                await asyncio.sleep(self.poll_interval_s)
            elif self.listener.head == seen_head:
                await self.listener.wait_for_change(self.poll_interval_s)
            await asyncio.sleep(max(0.0, started + self.min_interval_s - time.monotonic()))

    async def catch_up(self) -> int:
        """Apply every ApiKeyRevoked after the checkpoint; return how many were applied.

        A page that is not full saw every revocation up to the head read before it (readers never
        skip), so the checkpoint moves to that head: revocations are rare, and a checkpoint left at
        the last one would make every later read scan the whole log after it."""
        store = self.repository.store
        applied = 0
        while True:
            head = await store.head()
            page = await store.read_all(self.checkpoint, self.page_size, types=[REVOKED_EVENT])
            for event in page:
                _, key_id = parse_stream_id(event.stream_id)
                self._put(key_id, REVOKED)
                self.checkpoint = event.position
            applied += len(page)
            if len(page) < self.page_size:
                self.checkpoint = max(self.checkpoint, head)
                return applied
