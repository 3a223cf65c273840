"""The client address failed authentications are counted against, and the bound on what is kept."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from backend.http.auth_failures import AuthFailures
from backend.http.problems import Problem
from backend.http.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failures(trusted: str = "", *, burst: int = 3, rate: float = 1.0, max_buckets: int = 100,
             clock: Clock | None = None, hold_s: float = 0.0, max_held: int = 10) -> AuthFailures:
    networks = [ipaddress.ip_network(part, strict=False) for part in trusted.split(",") if part]
    return AuthFailures(RateLimiter(rate, burst, max_buckets=max_buckets, clock=clock or Clock()), networks,
                        hold_s=hold_s, max_held=max_held)


@pytest.mark.parametrize(("trusted", "remote", "forwarded", "client"), [
    ("", "192.0.2.1", [], "192.0.2.1"),
    ("", "192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # no trusted proxy: the header is the client's word
    ("127.0.0.1", "192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # from a peer that is not a trusted proxy
    ("127.0.0.1", "127.0.0.1", ["203.0.113.7"], "203.0.113.7"),
    ("127.0.0.1", "127.0.0.1", ["1.1.1.1, 203.0.113.7"], "203.0.113.7"),  # the client wrote 1.1.1.1
    ("127.0.0.1", "127.0.0.1", ["1.1.1.1", "203.0.113.7"], "203.0.113.7"),  # two header lines
    ("127.0.0.1,10.0.0.0/8", "127.0.0.1", ["203.0.113.7, 10.1.2.3, 10.9.9.9"], "203.0.113.7"),  # proxy chain
    ("127.0.0.1,10.0.0.0/8", "127.0.0.1", ["10.1.2.3"], "10.1.2.3"),  # every hop trusted: the leftmost
    ("127.0.0.1", "127.0.0.1", ["203.0.113.7, nonsense"], "127.0.0.1"),  # unreadable: the last trusted hop
    ("127.0.0.1", "127.0.0.1", [], "127.0.0.1"),
    ("127.0.0.1", "127.0.0.1", ["[2001:db8::1]"], "2001:db8::/64"),
    ("", "2001:db8::1", [], "2001:db8::/64"),  # IPv6 by /64: one host cannot hop between addresses
    ("", "2001:db8::ffff:1", [], "2001:db8::/64"),
    ("", "::ffff:192.0.2.5", [], "192.0.2.5"),
    ("", None, [], "unknown"),
])
def test_the_client_address(trusted: str, remote: str | None, forwarded: list[str], client: str) -> None:
    assert failures(trusted).client_of(remote, forwarded) == client


async def test_an_address_is_refused_after_its_burst_until_a_failure_is_allowed_again() -> None:
    clock = Clock()
    limited = failures(burst=3, rate=0.5, clock=clock)
    for _ in range(3):
        await limited.take("a")
    with pytest.raises(Problem) as refused:
        await limited.take("a")
    assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    assert refused.value.headers["Retry-After"] == "2"
    assert limited.refused == 1
    await limited.take("b")  # another address is not affected
    clock.now += 2.0
    await limited.take("a")
    with pytest.raises(Problem):
        await limited.take("a")
    limited.limiter.refund("a")  # a lookup that found a valid key gives its token back
    await limited.take("a")


async def test_the_table_of_addresses_is_bounded() -> None:
    limited = failures(max_buckets=50)
    for n in range(10_000):
        await limited.take(f"10.0.{n // 256}.{n % 256}")
    assert len(limited.limiter) == 50


async def test_refusals_are_held_back_but_only_so_many_at_once() -> None:
    limited = failures(burst=1, hold_s=30.0, max_held=2)
    await limited.take("a")
    refusals = [asyncio.ensure_future(limited.take("a")) for _ in range(5)]
    await asyncio.sleep(0)
    assert limited.held == 2
    done = [task for task in refusals if task.done()]
    assert len(done) == 3 and all(isinstance(task.exception(), Problem) for task in done)
    for task in refusals:
        task.cancel()
    await asyncio.gather(*refusals, return_exceptions=True)
    assert limited.held == 0
