"""Per-API-key rate limiting: a token bucket per key, in memory, per process (or per host).

Each key may spend `burst` requests at once and then `rate` per second. A bucket left idle for
burst/rate seconds is full again, which is exactly what a missing bucket means, so idle buckets
are dropped (oldest first) and memory stays bounded by the keys active in that window; a hard cap
on the number of buckets bounds it even under a flood of distinct keys.

With `serve --workers N` the buckets are the host's (`HostRateLimiter`, over the table of
backend/shared_limits.py), so N workers together admit the key's rate, not N times it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from backend.http.auth import ACTOR
from backend.http.problems import Problem
from backend.shared_limits import SharedLimits


@dataclass(slots=True)
class Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_buckets: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate limiter needs rate_per_s > 0 and burst >= 1")
        self.rate = rate_per_s
        self.burst = burst
        self.max_buckets = max_buckets
        self.clock = clock
        self.refill_s = burst / rate_per_s
        """How long an untouched bucket takes to be full again (then it can be forgotten)."""
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, key: str) -> float:
        """Take one token for key: 0.0 when allowed, else the seconds until one is available."""
        now = self.clock()
        self._evict_idle(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        self._buckets[key] = bucket  # most recently used last
        if len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def refund(self, key: str) -> None:
        """Give back a token taken by acquire() for something that turned out not to count."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(float(self.burst), bucket.tokens + 1.0)

    def _evict_idle(self, now: float) -> None:
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < self.refill_s:
                return
            self._buckets.popitem(last=False)


class HostRateLimiter:
    """The host's buckets, shared by its workers (`shared`, set once the app has mapped the table); a
    key that finds no room in the shared table, or comes before it is mapped, uses this process's own."""

    def __init__(self, local: RateLimiter) -> None:
        self.shared: SharedLimits | None = None
        self.local = local
        self.rate = local.rate
        self.burst = local.burst

    def acquire(self, key: str) -> float:
        wait = self.shared.acquire(key) if self.shared is not None else None
        return self.local.acquire(key) if wait is None else wait


class Limiter(Protocol):
    rate: float
    burst: int

    def acquire(self, key: str) -> float: ...


def rate_limit_middleware(limiter: Limiter) -> Middleware:
    """Must run after authentication (later in the middleware list): it limits by the caller's key."""

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        actor = request.get(ACTOR)
        if actor is not None:
            wait_s = limiter.acquire(actor.key_id)
            if wait_s > 0:
                retry_after = max(1, math.ceil(wait_s))
                raise Problem(429, "rate_limited",
                              f"this API key is limited to {limiter.rate:g} requests/s (burst {limiter.burst}); "
                              f"retry in {retry_after} s",
                              headers={"Retry-After": str(retry_after)})
        return await handler(request)

    return rate_limit
