"""Resolve a Bearer token to an Actor, from an in-process cache of keys so that authenticating
a request costs no database round trip once its key has been seen.

The cache holds, per key id, the key's SHA-256 secret hash, its Actor and its expiry; a presented
secret is checked against the cached hash in constant time, and a token that passed is remembered with
the entry it passed against, so its next request skips parsing and hashing for as long as that very
entry stays in the cache (a revocation or a reload replaces it). The expiry is checked every time.

Unknown key ids are remembered too, apart from the known keys (a flood of made-up ids must not push
the keys in use out of the cache), in a table of their own bounded like it, and only briefly (the
negative TTL, AUTH_NEGATIVE_TTL_S): a key that another process creates is found here once the TTL has
passed; one created through this process is found at once (mark_created). Key ids are drawn at random
when a key is created, so remembering an id as unknown for that long denies no client anything.

Revocation reaches every process within a second: the process's one tail of the log
(backend/store/tail.py, woken by the Listener's NOTIFY or its poll) hands this cache the `ApiKeyRevoked`
events after the head at startup, filtered in memory from the page it read anyway (or, while nobody
follows the whole log, from a read of that one type), and each replaces the key's entry with a tombstone.
A tombstone also wins over a concurrent cache fill that read the key before it was revoked, so a stale
"active" copy can never be installed after it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from backend.clock import SYSTEM_CLOCK, Clock
from backend.commands.api_keys import parse_token
from backend.commands.context import Actor
from backend.domain import ApiKey, parse_stream_id, verify_secret
from backend.store.events import RecordedEvent
from backend.store.repository import Repository
from backend.store.tail import LogTail, TailSubscriber

log = logging.getLogger(__name__)

REVOKED_EVENT = "ApiKeyRevoked"
SUBSCRIBER = "api-key-revocations"
"""Its name among the log tail's subscribers."""


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
    """No such key when it was looked up: remembered in the negative table, until its TTL is over."""


class NotCached:
    """authenticate_cached()'s answer when only a database lookup can tell."""


Entry = KnownKey | Revoked
Found = Entry | Unknown
REVOKED = Revoked()
UNKNOWN = Unknown()
NOT_CACHED = NotCached()


class ApiKeyAuthenticator:
    def __init__(
        self,
        repository: Repository,
        tail: LogTail | None = None,
        *,
        max_entries: int = 10_000,
        negative_ttl_s: float = 2.0,
        max_unknown: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        page_size: int = 1000,
        wall_clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.repository = repository
        self.tail = tail
        """Without one (tests, tools) nothing follows revocations: only fresh lookups see them."""
        self.max_entries = max_entries
        self.negative_ttl_s = negative_ttl_s
        self.max_unknown = max_unknown
        self.clock = clock
        self.wall_clock = wall_clock
        """Judges keys' expires_at (clock, monotonic, paces the cache)."""
        self.page_size = page_size
        self.checkpoint = 0
        """Position up to which ApiKeyRevoked events have been applied."""
        self.loads = 0
        """Database lookups made (tests and metrics)."""
        self._cache: OrderedDict[UUID, Entry] = OrderedDict()
        self._unknown: OrderedDict[UUID, float] = OrderedDict()
        """Key id -> clock() after which the database is asked again; oldest first."""
        self._creations = 0
        """Keys created through this process: a lookup that began before one does not remember "unknown"."""
        self._verified: dict[str, tuple[UUID, KnownKey]] = {}
        """Token -> (key id, the cache entry it was verified against)."""
        self._loading: dict[UUID, asyncio.Task[Found]] = {}
        self._subscription: TailSubscriber | None = None
        self.on_revoked: Callable[[str], None] | None = None
        """Told each key id this process learns is revoked: the live streams hub ends that key's streams,
        which were admitted before (a revocation takes away access that is already open, not only new)."""

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Follow revocations from the current head (older ones are visible to any later load)."""
        self.checkpoint = await self.repository.store.head()
        if self.tail is not None:
            self._subscription = self.tail.subscribe(SUBSCRIBER, self._receive, frozenset({REVOKED_EVENT}))
            self.tail.want(self._subscription, True)
            await self.tail.start()

    async def close(self) -> None:
        """Stop following revocations, and pending loads."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None and self.tail is not None:
            self.tail.unsubscribe(subscription)
        for task in list(self._loading.values()):
            task.cancel()

    # ---------------------------------------------------------------- requests

    async def authenticate(self, token: str) -> Actor | None:
        """The token's Actor, or None (unknown, revoked, expired, malformed or a wrong secret)."""
        found = self.authenticate_cached(token)
        if not isinstance(found, NotCached):
            return found
        key_id = parse_token(token)
        assert key_id is not None  # authenticate_cached() answers None for a malformed token
        return self._check(token, key_id, await self._load_once(key_id))

    def authenticate_cached(self, token: str) -> Actor | NotCached | None:
        """authenticate() as far as it goes without the database: NOT_CACHED when only a lookup can
        tell (the caller decides whether this client may cost one)."""
        verified = self._verified.get(token)
        if verified is not None and self._cache.get(verified[0]) is verified[1]:
            self._cache.move_to_end(verified[0])
            return self._unexpired(verified[1])
        key_id = parse_token(token)
        if key_id is None:
            return None
        entry = self._cached(key_id)
        return NOT_CACHED if entry is None else self._check(token, key_id, entry)

    def _check(self, token: str, key_id: UUID, entry: Found | None) -> Actor | None:
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

    def _unexpired(self, entry: KnownKey) -> Actor | None:
        if entry.expires_at is not None and self.wall_clock.now() >= entry.expires_at:
            return None
        return entry.actor

    def mark_revoked(self, key_id: UUID) -> None:
        """Mark a key revoked in this process at once (the tailer does it for every other one)."""
        self._revoke(key_id)

    def _revoke(self, key_id: UUID) -> None:
        self._put(key_id, REVOKED)
        if self.on_revoked is not None:
            self.on_revoked(str(key_id))

    def revoked(self, key_id: str) -> bool:
        """Whether this process has learnt that the key is revoked (since it was authenticated, say)."""
        return isinstance(self._cache.get(UUID(key_id)), Revoked)

    def expires_at(self, key_id: str) -> datetime | None:
        """When a key this process has verified expires (None: never, or no longer cached here)."""
        entry = self._cache.get(UUID(key_id))
        return entry.expires_at if isinstance(entry, KnownKey) else None

    def mark_created(self, key_id: UUID) -> None:
        """A key was created through this process: forget that its id was unknown, at once."""
        self._creations += 1
        self._unknown.pop(key_id, None)

    @property
    def unknown_cached(self) -> int:
        """Key ids remembered as unknown (bounded by max_unknown)."""
        return len(self._unknown)

    # ---------------------------------------------------------------- cache

    def _cached(self, key_id: UUID) -> Found | None:
        entry = self._cache.get(key_id)
        if entry is not None:
            self._cache.move_to_end(key_id)
            return entry
        until = self._unknown.get(key_id)
        if until is None:
            return None
        if until <= self.clock():
            del self._unknown[key_id]
            return None
        return UNKNOWN

    def _put(self, key_id: UUID, entry: Entry) -> None:
        self._unknown.pop(key_id, None)
        self._cache[key_id] = entry
        self._cache.move_to_end(key_id)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def _put_unknown(self, key_id: UUID) -> None:
        """Entries share one TTL, so insertion order is expiry order: the oldest go first."""
        now = self.clock()
        self._unknown.pop(key_id, None)
        self._unknown[key_id] = now + self.negative_ttl_s
        while self._unknown and (len(self._unknown) > self.max_unknown or next(iter(self._unknown.values())) <= now):
            self._unknown.popitem(last=False)

    async def _load_once(self, key_id: UUID) -> Found:
        """One database lookup per key id however many requests miss the cache together."""
        task = self._loading.get(key_id)
        if task is None:
            task = asyncio.create_task(self._load(key_id))
            self._loading[key_id] = task
            task.add_done_callback(functools.partial(self._loaded, key_id))
        return await asyncio.shield(task)

    def _loaded(self, key_id: UUID, task: asyncio.Task[Found]) -> None:
        if self._loading.get(key_id) is task:
            del self._loading[key_id]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter was cancelled

    async def _load(self, key_id: UUID) -> Found:
        self.loads += 1
        creations = self._creations
        key = await self.repository.find(ApiKey, key_id)
        entry: Entry
        if key is None:
            if creations == self._creations:
                self._put_unknown(key_id)
            return UNKNOWN
        if key.revoked or isinstance(self._cache.get(key_id), Revoked):
            entry = REVOKED  # a tombstone that arrived while we were reading wins
        else:
            actor = Actor(key_id=str(key.id), owner=key.owner, scopes=frozenset(key.scopes))
            entry = KnownKey(actor, key.secret_hash, key.expires_at)
        self._put(key_id, entry)
        return entry

    # ---------------------------------------------------------------- revocations

    async def _receive(self, after: int, events: list[RecordedEvent], end: int) -> None:
        """The tail's revocations in (after, end]; a gap below after (the tail joined, or jumped, past the
        checkpoint) is read from the store first. A failure ends the tail's run: it hands them again."""
        if after > self.checkpoint:
            await self.catch_up()
        for event in events:
            _, key_id = parse_stream_id(event.stream_id)
            self._revoke(key_id)
        self.checkpoint = max(self.checkpoint, end)

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
                self._revoke(key_id)
                self.checkpoint = event.position
            applied += len(page)
            if len(page) < self.page_size:
                self.checkpoint = max(self.checkpoint, head)
                return applied
