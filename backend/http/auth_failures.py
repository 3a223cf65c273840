"""Failed authentications, limited per client address.

A made-up key id costs a database lookup (the key cache cannot know it), so a client sending new ones
as fast as it can would spend the database on nothing. Each failure (no key, a malformed, unknown,
revoked or expired one, a wrong secret) takes a token from its address's bucket (rate and burst from
AUTH_FAILURE_RATE_PER_S and AUTH_FAILURE_BURST). While the bucket is empty, that address's requests
are authenticated from the key cache only: a key in use there still works, anything else is 429 with
Retry-After, and costs no lookup.

The client address is the peer's. Behind a reverse proxy every peer is the proxy, so when the peer is
one of TRUSTED_PROXIES the address is read from X-Forwarded-For: the rightmost entry that is not a
trusted proxy itself (the entries left of it are whatever the client wrote). IPv6 addresses count by
their /64, the block one host is commonly given. The buckets live in a bounded RateLimiter.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aiohttp import web

from backend.http.problems import Problem

if TYPE_CHECKING:  # backend.http.ratelimit imports backend.http.auth, which imports this (via appkeys)
    from backend.http.ratelimit import RateLimiter

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class AuthFailures:
    def __init__(self, limiter: RateLimiter, trusted_proxies: Sequence[Network] = ()) -> None:
        self.limiter = limiter
        self.trusted = tuple(trusted_proxies)
        self.failures = 0
        """Failed authentications counted (metrics)."""
        self.refused = 0
        """Requests answered 429 without a lookup (metrics)."""

    @property
    def active(self) -> bool:
        """Some address failed lately (else no request needs its address worked out first)."""
        return len(self.limiter) > 0

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

    def blocked(self, client: str) -> Problem | None:
        """The 429 to answer if the client has no failure left, else None (taking nothing)."""
        wait_s = self.limiter.wait_s(client)
        if wait_s <= 0:
            return None
        self.refused += 1
        retry_after = max(1, math.ceil(wait_s))
        return Problem(429, "rate_limited",
                       f"too many failed authentications from this address (at most {self.limiter.rate:g}/s "
                       f"after {self.limiter.burst}); retry in {retry_after} s",
                       headers={"Retry-After": str(retry_after)})

    def failed(self, client: str) -> None:
        self.failures += 1
        self.limiter.acquire(client)


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
