"""The parts create_app is made of, each on its own: the middleware chain in its order, and the brake on
failed authentications, as the settings turn them on or off."""

from __future__ import annotations

from pathlib import Path
from types import FunctionType

import pytest
from aiohttp.typedefs import Middleware

from backend.app import auth_failures, middleware_chain
from backend.config import ConfigError, Settings, load_settings
from backend.http.metrics import Metrics
from backend.http.ratelimit import HostRateLimiter
from backend.server.workers import WorkerPlace


def names(chain: list[Middleware]) -> list[str]:
    """Each middleware by the function that made it (or its own name), outermost first."""
    functions = [m for m in chain if isinstance(m, FunctionType)]
    assert len(functions) == len(chain)
    return [m.__qualname__.split(".<locals>")[0] for m in functions]


def test_the_chain_runs_auth_before_the_per_key_rate_limit() -> None:
    chain, host_limiter = middleware_chain(Settings(cors_allowed_origins=""), Metrics(), None)
    assert names(chain) == ["request_id_middleware", "metrics_middleware", "error_middleware", "auth_middleware",
                            "rate_limit_middleware"]
    assert host_limiter is None


def test_cors_is_outermost_and_a_zero_rate_limit_leaves_it_out() -> None:
    settings = Settings(cors_allowed_origins="https://app.example", rate_limit_per_s=0)
    chain, _ = middleware_chain(settings, Metrics(), None)
    assert names(chain) == ["cors_middleware", "request_id_middleware", "metrics_middleware", "error_middleware",
                            "auth_middleware"]


def test_a_worker_of_several_limits_through_the_host() -> None:
    _, host_limiter = middleware_chain(Settings(), Metrics(), WorkerPlace(0, Path("limits")))
    assert isinstance(host_limiter, HostRateLimiter)
    _, host_limiter = middleware_chain(Settings(rate_limit_burst=0), Metrics(), WorkerPlace(0, Path("limits")))
    assert host_limiter is None


async def test_the_auth_failure_brake_counts_and_is_off_at_a_zero_rate() -> None:
    off = Metrics()
    assert auth_failures(Settings(auth_failure_rate_per_s=0), off) is None
    assert b"tally_auth_failures_total" not in await off.render(5.0)
    on = Metrics()
    assert auth_failures(Settings(), on) is not None
    assert b"tally_auth_failures_total" in await on.render(5.0)


def test_a_metrics_port_needs_a_port_for_every_worker() -> None:
    """Worker i listens on METRICS_PORT + i: the last must still be a port."""
    assert load_settings(metrics_port=65534, workers=2).metrics_port == 65534
    with pytest.raises(ConfigError, match=r"METRICS_PORT: .*METRICS_PORT \+ WORKERS - 1 must be at most 65535"):
        load_settings(metrics_port=65535, workers=2)
