"""Failed authentications, limited per client address.

A made-up key id costs a database lookup (the key cache cannot know it), so a client sending new ones
as fast as it can would spend the database on nothing. A key the cache knows costs nothing and is not
counted. Anything else takes a token from its client address's bucket (rate and burst from
AUTH_FAILURE_RATE_PER_S and AUTH_FAILURE_BURST): a failure the cache can tell (no key, a malformed one,
a wrong secret, an id just found unknown), and a lookup, before it is made; a lookup that finds a
valid key gives its token back. Taking it first means concurrent requests cannot all slip through
while the first lookups are still on their way. With the bucket empty, the answer is 429 with
Retry-After and costs no lookup; a key already cached still works from that address.

The client address is the peer's. Behind a reverse proxy every peer is the proxy, so when the peer is
one of TRUSTED_PROXIES the address is read from X-Forwarded-For: the rightmost entry that is not a
trusted proxy itself (the entries left of it are whatever the client wrote). IPv6 addresses count by
their /64, the block one host is commonly given. The buckets live in a bounded RateLimiter.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from backend.commands.context import Actor
from backend.http.authenticator import ApiKeyAuthenticator, NotCached
from backend.http.problems import Problem

if TYPE_CHECKING:  # backend.http.ratelimit imports backend.http.auth, which imports this (via appkeys)
    from backend.http.ratelimit import RateLimiter

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class AuthFailures:
    def __init__(self, limiter: RateLimiter, trusted_proxies: Sequence[Network] = (), *,
                 hold_s: float = 0.0, max_held: int = 1000) -> None:
        self.limiter = limiter
        self.trusted = tuple(trusted_proxies)
        self.hold_s = hold_s
        self.max_held = max_held
        self.held = 0
        """429 answers being held back now (at most max_held)."""
        self.failures = 0
        """Failed authentications counted (metrics)."""
        self.refused = 0
        """Requests answered 429 without a lookup (metrics)."""

    async def uncached(self, request: web.BaseRequest, authenticator: ApiKeyAuthenticator, token: str | None,
                       found: NotCached | None) -> Actor | None:
        """The token's Actor or None (401), for a token the authenticator's cache did not answer with an
        Actor (`found`: what the cache said; the middleware asks it first, so a cached key never costs
        this client a token); raises the 429."""
        client = self.client(request)
        await self.take(client)
        if found is None or token is None:
            self.failures += 1
            return None
        actor = await authenticator.authenticate(token)
        if actor is None:
            self.failures += 1
        else:
            self.limiter.refund(client)
        return actor

    def client(self, request: web.BaseRequest) -> str:
        """The bucket key of the request's client address."""
        return self.client_of(request.remote, request.headers.getall("X-Forwarded-For", ()))

    def client_of(self, remote: str | None, forwarded_for: Sequence[str]) -> str:
        peer = _address(remote or "")
        if peer is None:
            return remote or "unknown"  # not an IP peer (a Unix socket): one bucket for all
        if self.trusted and self._is_trusted(peer):
            peer = self._forwarded_client(peer, ",".join(forwarded_for))
        return _bucket(peer)

    def _is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self.trusted)

    def _forwarded_client(self, peer: Address, forwarded: str) -> Address:
        """The rightmost untrusted X-Forwarded-For entry; the last trusted hop when an entry does not
        parse (only a trusted proxy wrote that far right) or when every entry is trusted."""
        client = peer
        for entry in reversed(forwarded.split(",")):
            address = _address(entry.strip())
            if address is None:
                return client
            client = address
            if not self._is_trusted(address):
                return client
        return client

    async def take(self, client: str) -> None:
        """One token of client's bucket, or the 429 (raised) when there is none, held back hold_s first
        (while fewer than max_held are): a client that keeps its connections busy failing is slowed to
        a request per hold_s on each, at the cost of a sleeping coroutine, not of the event loop's time
        that every other client shares."""
        wait_s = self.limiter.acquire(client)
        if wait_s <= 0:
            return
        self.refused += 1
        if self.hold_s > 0 and self.held < self.max_held:
            self.held += 1
            try:
                await asyncio.sleep(self.hold_s)
            finally:
                self.held -= 1
        retry_after = max(1, math.ceil(wait_s))
        raise Problem(429, "rate_limited",
                      f"too many failed authentications from this address (at most {self.limiter.rate:g}/s "
                      f"after {self.limiter.burst}); retry in {retry_after} s",
                      headers={"Retry-After": str(retry_after)})


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _bucket(address: Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
